import sys

from bleep_rs.cli import main

sys.exit(main())
