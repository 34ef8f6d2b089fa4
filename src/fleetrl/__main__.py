"""python -m fleetrl: the command line."""

import sys

from fleetrl.cli import main

sys.exit(main())
