"""`python -m saebench ...`: the `saebench` command (what `torchrun -m saebench train ...` runs per rank)."""

import sys

from saebench.cli import main

if __name__ == "__main__":
    sys.exit(main())
