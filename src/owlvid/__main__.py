"""`python -m owlvid ...` is the `owlvid` command line."""

import sys

from .cli import main

sys.exit(main())
