"""``python -m compose ...`` is the ``compose`` command."""

import sys

from .cli import main

sys.exit(main())
