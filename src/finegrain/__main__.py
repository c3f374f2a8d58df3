"""`python -m finegrain ...`, as torchrun starts each rank: `torchrun --nproc-per-node 2 -m finegrain train CONFIG`."""

import sys

from finegrain.cli import main

sys.exit(main())
