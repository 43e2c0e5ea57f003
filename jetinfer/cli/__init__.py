"""The `jetinfer` command: one entry point, subcommands contributed by each package.

Each module in `COMMAND_MODULES` has `register(subparsers)`, which adds its subcommands with
`set_defaults(handler=fn)`; `fn(args) -> int` is the exit status. Errors jetinfer raises on purpose
(bad settings, missing files, unreachable NATS) print one line naming the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Final

from jetinfer.errors import JetinferError

__all__ = ["COMMAND_MODULES", "QUIET_COMMANDS", "build_parser", "main"]

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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jetinfer",
        description="Queue-based inference workers on NATS JetStream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (env JETINFER_LOG_LEVEL; default INFO, WARNING for commands that print results)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_by_default = args.command in QUIET_COMMANDS
    level = (
        args.log_level or os.environ.get("JETINFER_LOG_LEVEL") or ("WARNING" if quiet_by_default else "INFO")
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except (JetinferError, ConnectionError, FileNotFoundError, TimeoutError) as exc:
        print(f"jetinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
