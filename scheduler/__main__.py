"""``python -m scheduler run --config FILE``."""

import sys

from scheduler.cli import main

sys.exit(main())
