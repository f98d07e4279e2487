"""``python -m tierckpt``: the ``tierckpt`` command."""

import sys

from .cli import main

sys.exit(main())
