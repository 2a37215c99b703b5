"""A fresh process that opens one store and reports as JSON (used by opentime and memory).

    python -m benchmarks._child open|touch STORE PATH N

The store's library is imported before anything is measured: the figures
are the open and the reads, not Python's start-up or imports.
"""

import json
import sys
import time


def main(argv):
    mode, store, path, n = argv[0], argv[1], argv[2], int(argv[3])
    start = time.perf_counter()
    from . import _bigstores as B
    from .harness import OURS
    if store != OURS:  # import the library now, so that it is not part of the figure
        module = {"sqlite3": "sqlite3", "lmdb": "lmdb", "ZODB": "ZODB.FileStorage", "diskcache": "diskcache",
                  "shelve": "shelve", "pickle": "pickle"}[store]
        __import__(module)
        if store == "ZODB":
            import BTrees.IOBTree  # noqa: F401
            import transaction  # noqa: F401

            from . import _zodb  # noqa: F401
    imports = time.perf_counter() - start
    result = B.open_one(store, path, n) if mode == "open" else B.touch(store, path, n)
    result["imports"] = imports
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
