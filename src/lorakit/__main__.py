"""`python -m lorakit ...` (also what `accelerate launch -m lorakit train ...` runs)."""

import sys

from .cli.main import main

sys.exit(main())
