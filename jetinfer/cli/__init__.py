"""The `jetinfer` command: one entry point, subcommands contributed by each package.

Each module in `COMMAND_MODULES` has `register(subparsers)`, which adds its subcommands with
`set_defaults(handler=fn)`; `fn(args) -> int` is the exit status. Errors jetinfer raises on purpose
(bad settings, missing files, unreachable NATS) print one line naming the fix, never a traceback.
Bare `jetinfer` prints the commands (exit 2); an unknown flag shows its subcommand's usage and the
closest flag it has; output cut short by the reader (`jetinfer models --json | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from jetinfer.errors import JetinferError
from jetinfer.settings import add_arguments, load_settings, require, setting

__all__ = ["COMMAND_MODULES", "QUIET_COMMANDS", "TopLevelSettings", "build_parser", "main"]

#: Commands whose output is the point: their logs start at WARNING unless asked otherwise.
QUIET_COMMANDS: Final = frozenset({"demo", "infer", "video", "bench", "engine-bench", "models"})

COMMAND_MODULES: Final = (
    "jetinfer.worker.cli",
    "jetinfer.producer.cli",
    "jetinfer.builder.cli",
    "jetinfer.bench.load",
    "jetinfer.bench.engine",
    "jetinfer.cli.demo",
)

_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(kw_only=True)
class TopLevelSettings:
    """What every `jetinfer` command takes before its name."""

    log_level: str | None = setting(
        None,
        f"logging level: {', '.join(_LEVELS)}",
        default_text=f"INFO (WARNING for {', '.join(sorted(QUIET_COMMANDS))})",
    )

    def __post_init__(self) -> None:
        if self.log_level is not None:
            self.log_level = self.log_level.upper()
        require(
            self.log_level is None or self.log_level in _LEVELS,
            "log_level",
            f"{self.log_level!r} is not one of {', '.join(_LEVELS)}",
        )

    def level_for(self, command: str) -> str:
        """The level to log at for `command`."""
        return self.log_level or ("WARNING" if command in QUIET_COMMANDS else "INFO")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jetinfer",
        description="Queue-based inference workers on NATS JetStream. `jetinfer COMMAND --help` lists a "
        "command's options; every option is also a JETINFER_* variable.",
    )
    add_arguments(parser, TopLevelSettings)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            chosen: argparse.ArgumentParser = action.choices[command]
            return chosen
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """'unrecognized arguments: ...', with the closest flag of `parser` for each unknown one."""
    known = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{extra.split('=', 1)[0]}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + ("".join(f"; {h}" for h in hints))


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush meets no closed pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        if extras:
            parser.error(_unrecognized(parser, extras))
        parser.print_help(sys.stderr)
        return 2
    if extras:
        _subparser(parser, args.command).error(_unrecognized(_subparser(parser, args.command), extras))
    try:
        cli = load_settings(TopLevelSettings, args)
    except JetinferError as exc:
        print(f"jetinfer: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cli.level_for(args.command),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = int(args.handler(args))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say to it
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off this way
    except KeyboardInterrupt:
        return 130
    except (JetinferError, ConnectionError, FileNotFoundError, TimeoutError) as exc:
        print(f"jetinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
