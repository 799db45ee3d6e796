"""The ``colorize`` command's entry point: SIGTERM stops it as Ctrl-C does from its first
moment, before the seconds that importing torch and Ray take (a ``kill`` then ended it with
exit status 143 and no word), and either one after its last, while Ray shuts down, ends the
process at once with the command's status."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from colorize import errors


def main(argv: Sequence[str] | None = None) -> int:
    errors.stop_on_sigterm()
    try:
        from colorize import cli
    except KeyboardInterrupt:
        print("colorize: interrupted", file=sys.stderr)
        return 130  # cli.EXIT_INTERRUPTED, which is not imported yet
    status = cli.main(argv)
    _leave_at_once_on_a_signal(status)
    return status


def _leave_at_once_on_a_signal(status: int) -> None:
    """The command is over: what is left is Ray's shutdown and the interpreter's. A Ctrl-C or
    SIGTERM there raised KeyboardInterrupt into whatever was being torn down, a traceback
    ("Exception ignored in ...") after the command's last line; now it ends the process, with
    the command's status. (Ray's processes end with their driver, however it ends.)"""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: main() has dealt with it
            stream.flush()

    def leave(signum: int, frame: FrameType | None) -> None:
        os._exit(status)

    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, leave)


if __name__ == "__main__":
    sys.exit(main())
