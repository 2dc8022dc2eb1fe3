import sys

from jaxhicache.cli import main

sys.exit(main())
