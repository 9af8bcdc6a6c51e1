"""``python -m vtprune.cli``: the same as the ``vtprune`` command."""

import sys

from vtprune.cli import main

sys.exit(main())
