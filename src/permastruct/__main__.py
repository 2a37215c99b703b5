"""``python -m permastruct``: see :mod:`permastruct.cli`."""

import os
import sys

from .cli import main

if __name__ == "__main__":
    # Name the program as it was started: "python3 -m permastruct" (argparse would say "__main__.py").
    sys.exit(main(prog=f"{os.path.basename(sys.orig_argv[0]) or 'python3'} -m permastruct"))
