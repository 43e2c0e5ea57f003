"""Child processes that die with their parent, even when the parent is killed with `kill -9`.

`spawn` starts a child in a process group of its own and tells this process's *watchdog* about it: a
small Python process (standard library only) that reads a pipe only this process can write to. A
parent that dies in any way closes that pipe (the kernel closes its files); the watchdog then kills
every group still registered (SIGKILL, so grandchildren such as a worker's decoding processes go
too) and removes every folder still registered (an embedded nats-server's temporary store), and
exits. A child stopped the ordinary way is unregistered (`forget`). This works whichever thread
started the child, which Linux's parent-death signal (PR_SET_DEATHSIG, tied to the thread) does not.

    process = spawn(["nats-server", "-c", conf], stdout=log)
    ...
    process.terminate(); process.wait(); forget(process)
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Final

__all__ = ["forget", "forget_folder", "remove_with_parent", "spawn", "watchdog_pid"]

logger = logging.getLogger(__name__)

# Runs with `python -I -S -c`: no site, no jetinfer, nothing to import but the standard library.
_WATCHDOG: Final = """
import os, shutil, signal, sys
groups, folders = set(), set()
for line in sys.stdin:
    command, _, argument = line.rstrip("\\n").partition(" ")
    if command == "group":
        groups.add(int(argument))
    elif command == "forget":
        groups.discard(int(argument))
    elif command == "folder":
        folders.add(argument)
    elif command == "forget-folder":
        folders.discard(argument)
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)
"""


class _Watchdog:
    """This process's watchdog and the write end of its pipe (started at the first `spawn`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._write: int | None = None

    def _start(self) -> int:
        read, write = os.pipe()  # both ends non-inheritable: no other child gets the write end
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG],
                stdin=read,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the parent's group leaves it alone
            )
        finally:
            os.close(read)
        self._write = write
        return write

    def tell(self, line: str) -> None:
        """Send one command to the watchdog, starting it first (or again, if it died) if needed."""
        data = (line + "\n").encode()
        with self._lock:
            write = self._write if self._write is not None else self._start()
            try:
                os.write(write, data)
            except BrokenPipeError:  # someone killed the watchdog: start another for what comes next
                logger.warning("the child watchdog died; starting another")
                os.close(write)
                if self._process is not None:
                    self._process.wait()
                os.write(self._start(), data)

    @property
    def pid(self) -> int | None:
        """The watchdog's process id, once started."""
        return self._process.pid if self._process is not None else None

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the pipe (the watchdog cleans up what is still registered and exits) and reap it."""
        with self._lock:
            write, self._write = self._write, None
            process, self._process = self._process, None
        if write is not None:
            os.close(write)
        if process is not None:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("the child watchdog (pid %d) did not exit; killing it", process.pid)
                process.kill()
                process.wait()

    def after_fork_in_child(self) -> None:
        """A forked child must not keep the parent's pipe open (nor own its watchdog)."""
        if self._write is not None:
            os.close(self._write)
        self._write = None
        self._process = None
        self._lock = threading.Lock()


_watchdog = _Watchdog()
atexit.register(_watchdog.close)
os.register_at_fork(after_in_child=_watchdog.after_fork_in_child)


def spawn(command: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(command, **popen_kwargs)` in a new process group that dies with this process."""
    process: subprocess.Popen[bytes] = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    try:
        _watchdog.tell(f"group {process.pid}")
    except OSError:
        process.kill()
        process.wait()
        raise
    return process


def forget(process: subprocess.Popen[Any]) -> None:
    """Stop watching a child that was stopped the ordinary way (after it has been waited for)."""
    try:
        _watchdog.tell(f"forget {process.pid}")
    except OSError as exc:  # the watchdog is gone: nothing is left to forget
        logger.warning("telling the child watchdog about pid %d failed: %s", process.pid, exc)


def remove_with_parent(folder: Path) -> None:
    """Have `folder` removed if this process dies before it calls `forget_folder` (a temporary store)."""
    _watchdog.tell(f"folder {Path(folder).resolve()}")


def forget_folder(folder: Path) -> None:
    """This process removed `folder` itself (or keeps it): the watchdog need not."""
    try:
        _watchdog.tell(f"forget-folder {Path(folder).resolve()}")
    except OSError as exc:
        logger.warning("telling the child watchdog about %s failed: %s", folder, exc)


def watchdog_pid() -> int | None:
    """The process id of this process's watchdog, once a child was spawned (for tests and debugging)."""
    return _watchdog.pid
