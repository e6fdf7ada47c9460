"""``python -m mnn_callback``: the command line (see :mod:`mnn_callback.cli`)."""

import sys

from mnn_callback.cli import main

sys.exit(main())
