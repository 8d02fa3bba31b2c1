"""`python -m cli`: the `xsam` console script without the script (tests, bench, subprocesses)."""

import sys

from cli import main

sys.exit(main())
