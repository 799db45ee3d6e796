"""Ray job entrypoint: `python -m jobs.evaluate ...` is `colorize evaluate ...`."""

import sys

from colorize.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
