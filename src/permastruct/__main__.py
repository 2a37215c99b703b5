"""``python -m permastruct``: see :mod:`permastruct.cli`."""

import sys

from .cli import main

sys.exit(main())
