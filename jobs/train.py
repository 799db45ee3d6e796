"""Ray job entrypoint: `python -m jobs.train ...` is `colorize train ...`."""

import sys

from colorize.entry import main  # SIGTERM handled before torch and Ray are imported

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
