"""Ray-free entrypoint of the ablation study: ``python -m jobs.ablation --data CIFAR10_JPEG_DIR``."""

from colorize.ablation import main

if __name__ == "__main__":
    main()
