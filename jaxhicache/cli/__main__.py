"""``python -m jaxhicache.cli``: the same as ``jaxhicache``."""

import sys

from jaxhicache.cli.app import main

sys.exit(main())
