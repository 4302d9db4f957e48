"""`python -m ummae` (also what `torchrun -m ummae` runs)."""

import sys

from .cli import main

sys.exit(main())
