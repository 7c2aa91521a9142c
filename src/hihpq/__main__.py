"""``python -m hihpq`` (and ``torchrun ... -m hihpq``): the command line."""

import sys

from hihpq.cli import main

sys.exit(main())
