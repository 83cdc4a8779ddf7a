"""`python -m quotad_server` is `quotad`."""

import sys

from quotad_server.entry import main

sys.exit(main())
