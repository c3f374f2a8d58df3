"""`python -m finegrain.serve RUN_DIR ... [options]`, the same as `finegrain serve`."""

import sys

from finegrain.serve.cli import main

sys.exit(main())
