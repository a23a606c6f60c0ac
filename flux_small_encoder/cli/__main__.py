"""`python -m flux_small_encoder.cli`: the `flux-small-encoder` command."""

import sys

from . import main

sys.exit(main())
