"""`python -m trinity.cli ...` is the same as the `trinity` script (and works under `python -m mpi4py -m trinity.cli`)."""

import sys

from .main import entry

sys.exit(entry())
