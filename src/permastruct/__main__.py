"""``python -m permastruct``: see :mod:`permastruct.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
