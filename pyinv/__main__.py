"""``python -m pyinv``: the ``pyinv`` command line."""

import sys

from .cli import main

sys.exit(main())
