"""``python -m shmbus.coordinator``: the older spelling of ``shmbus coordinator``."""

import sys

from ..cli.coordinator import main

sys.exit(main())
