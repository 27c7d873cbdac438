"""``python -m moreft.bench`` is ``moreft bench`` (also how ``--e2e`` starts its child runs)."""

import sys

from moreft.cli.bench import main

sys.exit(main())
