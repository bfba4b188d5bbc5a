import sys

from blipserve.cli import main

sys.exit(main())
