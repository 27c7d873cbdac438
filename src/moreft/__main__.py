"""``python -m moreft ...`` is the ``moreft`` command."""

import sys

from moreft.cli import main

sys.exit(main())
