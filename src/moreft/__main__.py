"""``python -m moreft ...`` is the ``moreft`` command."""

import sys

from moreft._entry import main

sys.exit(main())
