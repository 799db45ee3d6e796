"""Ray job entrypoint: `python -m jobs.train ...` is `colorize train ...`."""

import sys

from colorize.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
