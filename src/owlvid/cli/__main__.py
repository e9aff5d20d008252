"""`python -m owlvid.cli` (as `owlvid` and `python -m owlvid`)."""

from . import main

raise SystemExit(main())
