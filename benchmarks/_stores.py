"""How each store is opened, the same way in every workload (and in the child processes).

The settings are each library's defaults unless a workload says otherwise:
sqlite3 in its default rollback-journal mode with ``synchronous=FULL``;
LMDB with ``sync=True`` and a map large enough for the data; ZODB's
FileStorage with its default cache of 400 objects; diskcache's defaults
(sqlite in WAL mode, ``synchronous=NORMAL``) except its size limit, raised
from 1 GB to 1 TB so that it never evicts; shelve over the dbm module this
Python has.
"""

import contextlib
import os

from permastruct import Dict, List, SortedDict, Storage

from ._context import remove

LMDB_MAP = 64 << 30  # address space only; LMDB grows the file as it writes


# -- permastruct schemas used across the workloads -------------------------------------------
class BenchStorage(Storage):
    """Every type a workload needs, in one schema."""

    def populateSchema(self):
        s = self.schema

        class Rec(s.Structure):
            i = s.Int
            f = s.Float
            name = s.ByteString

        class Big(s.Structure):
            i = s.Int
            f = s.Float
            payload = s.ByteString

        class Agent(s.Structure):
            age = s.Int
            weight = s.Float

        self.define(List("Recs")[Rec])
        self.define(List("Bigs")[Big])
        self.define(List("Ints")[s.Int])
        self.define(Dict("KeyIndex")[s.ByteString, s.Int])
        self.define(SortedDict("IntIndex")[s.Int, s.Int])

        class Root(s.Structure):
            agent = Agent
            counter = s.Int
            recs = self.schema.Recs
            bigs = self.schema.Bigs
            ints = self.schema.Ints
            keys = self.schema.KeyIndex
            index = self.schema.IntIndex
            blob = s.Buffer


def open_ours(path, **kwargs):
    return BenchStorage(path, **kwargs)


# -- peers -------------------------------------------------------------------------------------
def open_sqlite(path, *, sync=True, wal=False, synchronous=None):
    """A sqlite3 connection: ``synchronous=FULL`` (``sync``) or ``OFF``, unless ``synchronous`` names the level."""
    import sqlite3
    conn = sqlite3.connect(path, isolation_level="DEFERRED")
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous or ('FULL' if sync else 'OFF')}")
    return conn


def open_lmdb(path, *, sync=True, readonly=False, map_size=LMDB_MAP):
    import lmdb
    return lmdb.open(path, map_size=map_size, sync=sync, metasync=sync, readonly=readonly, lock=not readonly,
                     subdir=True, max_dbs=0)


class ZODBHandle:
    """A FileStorage, its DB, one connection and its root, closed together."""

    def __init__(self, path, *, readonly=False, blob_dir=None):
        import ZODB
        import ZODB.FileStorage
        self.storage = ZODB.FileStorage.FileStorage(path, read_only=readonly, blob_dir=blob_dir)
        self.db = ZODB.DB(self.storage)
        self.conn = self.db.open()
        self.root = self.conn.root()

    def close(self):
        import transaction
        transaction.abort()
        self.conn.close()
        self.db.close()


def open_zodb(path, **kwargs):
    return ZODBHandle(path, **kwargs)


def zodb_remove(path):
    for suffix in ("", ".index", ".lock", ".tmp", ".old", ".blobs"):
        remove(path + suffix)


#: diskcache's default size limit (1 GB) culls entries from a larger cache: raised, so that it keeps everything.
DISKCACHE_SIZE_LIMIT = 1 << 40


def open_diskcache(path):
    import diskcache
    return diskcache.Cache(path, size_limit=DISKCACHE_SIZE_LIMIT)


def open_shelve(path, flag="c"):
    import shelve
    return shelve.open(path, flag=flag)


def shelve_remove(path):
    folder, base = os.path.split(path)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name == base or name.startswith(base + "."):
                remove(os.path.join(folder, name))


def dbm_backend():
    """The dbm module shelve uses here (``dbm.dumb`` when Python has no gdbm/ndbm)."""
    import dbm
    return dbm._defaultmod.__name__ if getattr(dbm, "_defaultmod", None) else _probe_dbm()


def _probe_dbm():
    for name in ("dbm.gnu", "dbm.ndbm", "dbm.dumb"):
        with contextlib.suppress(ImportError):
            __import__(name)
            return name
    return "none"


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_size(path):
    """Bytes of a file, or of every file under a folder (a store that is a folder)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(folder, name))
    return total


def store_bytes(path):
    """The bytes a store occupies: the path and its siblings named ``path.*`` / ``path-*``."""
    folder, base = os.path.split(path)
    total = 0
    for name in os.listdir(folder):
        if name == base or name.startswith(base + ".") or name.startswith(base + "-"):
            total += tree_size(os.path.join(folder, name))
    return total
