"""`python -m sdxl_client ...` runs the `sdxl` command line."""

import sys

from sdxl_client.cli import main

sys.exit(main())
