"""`python -m flux_small_encoder.train`: kept for existing launch commands; `python -m flux_small_encoder.training`
is the same entry point.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
