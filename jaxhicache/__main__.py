"""``python -m jaxhicache``: the command line, :func:`jaxhicache.cli.main` (see ``cli/``)."""

import sys

from jaxhicache.cli import main

sys.exit(main())
