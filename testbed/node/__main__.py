"""`python -m testbed.node --listen HOST:PORT ...`: run one node server (see testbed.node.server)."""

import sys

from testbed.node.server import main

sys.exit(main())
