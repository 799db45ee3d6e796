"""Ray job entrypoint: `python -m jobs.colorize ...` is `colorize run ...`."""

import sys

from colorize.entry import main  # SIGTERM handled before torch and Ray are imported

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
