import sys

from xsam.cli import main

sys.exit(main())
