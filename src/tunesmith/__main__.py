"""`python -m tunesmith ...`, which is also what `torchrun -m tunesmith train cfg.yaml` runs on each rank."""

import sys

from tunesmith.cli import main

if __name__ == "__main__":
    sys.exit(main())
