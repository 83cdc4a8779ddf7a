"""`python -m quotad_server` is `quotad`."""

import sys

from quotad_server.cli import main

sys.exit(main())
