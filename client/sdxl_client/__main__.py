"""`python -m sdxl_client ...` runs the `sdxl` command line."""

import sys

from .cli import main

sys.exit(main())
