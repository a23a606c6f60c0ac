"""`python -m flux_small_encoder.training --config NAME [key=value ...]`: the entry point for `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 8 -m flux_small_encoder.training --config stage1-compbench \
        model=black-forest-labs/FLUX.1-dev output_dir=runs/s1

It takes the same arguments as `flux-small-encoder train`.
"""

import sys

from flux_small_encoder.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
