"""`python -m saebench ...`: the `saebench` command (what `torchrun -m saebench train|run` runs per rank)."""

import os
import sys

if int(os.environ.get("RANK", "0")) > 0:  # a torchrun rank but the first: progress bars are rank 0's
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported, so before anything imports it

from saebench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
