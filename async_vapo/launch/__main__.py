"""``python -m async_vapo.launch``."""

import sys

from async_vapo.launch.cli import main

sys.exit(main())
