import sys

from spokes_lightning.cli.spokes import main

sys.exit(main())
