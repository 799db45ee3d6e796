"""The ``colorize`` command's entry point: SIGTERM stops it as Ctrl-C does from its first
moment, before the seconds that importing torch and Ray take (a ``kill`` then ended it with
exit status 143 and no word)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from colorize import errors


def main(argv: Sequence[str] | None = None) -> int:
    errors.stop_on_sigterm()
    try:
        from colorize import cli
    except KeyboardInterrupt:
        print("colorize: interrupted", file=sys.stderr)
        return 130  # cli.EXIT_INTERRUPTED, which is not imported yet
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
