"""`python -m rsmoe.cli <command> ...` (what the launchers run under torchrun / srun)."""

import sys

from rsmoe.cli import main

sys.exit(main())
