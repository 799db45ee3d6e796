"""Ray job entrypoint: `python -m jobs.colorize ...` is `colorize run ...`."""

import sys

from colorize.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
