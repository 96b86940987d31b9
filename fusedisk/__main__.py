"""``python -m fusedisk`` is the ``fusedisk`` command."""

import sys

from .cli import main

sys.exit(main())
