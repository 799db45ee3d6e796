"""Ray job entrypoint: `python -m jobs.evaluate ...` is `colorize evaluate ...`."""

import sys

from colorize.entry import main  # SIGTERM handled before torch and Ray are imported

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
