"""``Storage.backup()``: a consistent copy of a store's last commit, written while others keep committing.

Layer 11 of the architecture (``docs/architecture.rst``), beside ``_check``.

Theory of operation
===================

The copy is the committed image of every page, taken from where the open
storage already knows it to be, so nothing is locked and nobody waits:

*A writer* knows its last commit as the newest logged image of each log unit
(the engine's ``_logged``: in memory, or a position in its log) and the main
file for every unit not logged since the last checkpoint.  Its own
uncommitted changes live only in its private map, which the copy never
reads; a checkpoint runs only inside this writer's own commits, never during
the copy.

*A reader* copies its snapshot: its private map of the main file with the
log's pages of that snapshot laid over it (a checkpoint never copies into
the main file past the oldest reader's snapshot, so the pages it has not
read yet still hold that snapshot).

The copy gets a new header block: a new random store id (so that no log of
the original can ever be replayed onto it: a log counts for a main file only
with its store id), one root record with the same transaction, page count,
free-page head and slots, no log path.  It is written under a temporary name
beside the target, fsynced, linked at the target name (which fails if a file
appeared there meanwhile) and the folder fsynced: a crash leaves the target
missing or whole, never partial.  It opens as an ordinary store with no log.
"""

import contextlib
import errno
import os

from . import _format as F
from ._mapping import GRANULE, OS_PAGE, sync_folder
from .errors import StorageFullError

__all__ = ["backup", "compact_copy", "compact_in_place"]

_CHUNK = 1 << 20
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def backup(storage, path):
    """Copy the last commit of ``storage`` (its snapshot, in a reader) to the new file ``path``.

    Returns a dict: ``path``, ``transaction``, ``pages`` and ``bytes`` (the
    copy's size).  See the module documentation.
    """
    pf = storage._page_file
    target = os.path.abspath(os.fspath(path))
    _refuse_target(storage, target)
    if pf.readonly:
        page_count, free_head, slots = pf.page_count, pf.free_head, list(pf.slots)
        read = _snapshot_reader(pf)
    else:
        pf.settle()
        page_count, free_head, slots = pf._committed
        slots = list(slots)
        read = _committed_reader(pf)
    txn, page_size = pf.txn, pf.page_size
    data_bytes = page_count * page_size
    unit = max(GRANULE, page_size)
    size = F.HEADER_BLOCK + -(-data_bytes // unit) * unit
    header = bytearray(F.HEADER_BLOCK)
    store_id = int.from_bytes(os.urandom(8), "little") or 1
    header[:F.HEADER.size] = F.pack_header(page_size, store_id=store_id)
    header[F.ROOT_OFFSETS[0]:F.ROOT_OFFSETS[0] + F.ROOT.size] = F.pack_root(txn, page_count, free_head, slots)
    folder = os.path.dirname(target)
    temporary = os.path.join(folder, f".{os.path.basename(target)}.backup-{os.getpid()}")
    fd = -1
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)  # a full disk fails here, before anything is written
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        _write(fd, bytes(header), 0)
        offset = F.HEADER_BLOCK
        end = F.HEADER_BLOCK + data_bytes
        while offset < end:
            length = min(_CHUNK, end - offset)
            _write(fd, read(offset, length), offset)
            offset += length
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _publish(temporary, target)
        sync_folder(folder)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if exc.errno in _FULL:
            raise StorageFullError(exc.errno, f"backup of {storage.fileName!r} to {target!r} failed: "
                                   f"{os.strerror(exc.errno)}; no file was left at the target") from exc
        raise
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return {"path": target, "transaction": txn, "pages": page_count, "bytes": size}


def compact_copy(storage, path):
    """Copy only what the last commit of ``storage`` can reach to the new file ``path``, renumbered.

    A full :func:`backup` under a temporary name first (so that the source
    is one committed state whatever the writer does meanwhile), then its
    reachable objects are rebuilt in a new store at ``path`` through the
    JSON form of :mod:`permastruct._dump` (objects in consecutive pages,
    every offset new), and the full copy is removed.  Needs room for both
    copies meanwhile, and memory for the whole JSON form.
    """
    from . import _dump
    from .storage import Storage
    target = os.path.abspath(os.fspath(path))
    _refuse_target(storage, target)
    folder = os.path.dirname(target)
    full = os.path.join(folder, f".{os.path.basename(target)}.full-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(full)
    try:
        summary = backup(storage, full)
        with Storage(full, readonly=True) as source:
            document = _dump.dump_json(source)
        os.unlink(full)
        _dump.load_json(document, target, pageSize=storage._page_file.page_size)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(full)
    summary.update(path=target, bytes=os.path.getsize(target), objects=len(document["objects"]))
    with Storage(target, readonly=True) as copy:
        summary["pages"] = copy._page_file.page_count
    return summary


def compact_in_place(path):
    """Rewrite the store at ``path`` with only what its root reaches, in consecutive pages.

    Refuses (StorageLockedError) while a writer or a reader has it open.
    The compact copy is made under a temporary name; then, still holding
    the writer lock of the old file, its log is emptied into it and
    removed, and the copy is renamed over it (an atomic replacement: a
    crash leaves the old store or the new one, and perhaps a hidden
    temporary file beside it).  Returns ``{"before",
    "after"}`` (file sizes in bytes).
    """
    from .errors import StorageLockedError
    from .storage import Storage
    path = os.path.realpath(os.fspath(path))  # (through a symlink: the file it names is replaced)
    folder = os.path.dirname(path)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.compact-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    with Storage(path) as store:  # the writer lock (another writer: StorageLockedError)
        readers = store.readers()
        if readers:
            raise StorageLockedError(f"{path!r} is open for reading by process {readers[0]['pid']} (and "
                                     f"{len(readers) - 1} more): compact replaces the file, so it runs only "
                                     "when no one has the store open")
        before = os.path.getsize(path)
        pf = store._page_file
        try:
            compact_copy(store, temporary)
            store.commit()
            pf.checkpoint(truncate=True)
            pf._remove_log()
            if pf.journal is not None:  # (a reader came and keeps the log: the old file stays)
                raise StorageLockedError(f"{path!r}: a reader opened it during the compaction; nothing "
                                         "was replaced")
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        sync_folder(folder)
    return {"before": before, "after": os.path.getsize(path)}


def _refuse_target(storage, target):
    """ValueError for the store's own file or log; FileExistsError for any other existing file."""
    own = []
    if storage.fileName is not None:  # (an in-memory store has no file of its own)
        own = [storage.fileName, storage.fileName + F.WAL_SUFFIX]
        log = storage._page_file.log_path() if storage._page_file.mode == "file" else None
        if log is not None:
            own.append(log)
    real = os.path.realpath(target)
    for name in own:
        if real == os.path.realpath(name) or (os.path.exists(target) and os.path.exists(name)
                                              and os.path.samefile(target, name)):
            raise ValueError(f"cannot back {storage!r} up onto {target!r}: that is the store itself or its "
                             "log; give a new file name")
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, f"backup target {target!r} exists: give a new file name", target)


def _committed_reader(pf):
    """(Writer) ``read(offset, length)``: the committed bytes there (logged images, else the main file)."""
    logged, unit = pf._logged, pf.journal.unit if pf.journal is not None else OS_PAGE  # (an overlay: no log)

    def read(offset, length):
        data = bytearray(pf.io.pread(length, offset))
        if len(data) < length:
            data.extend(bytes(length - len(data)))
        if logged and unit:
            first = offset // unit * unit
            for at in range(first, offset + length, unit):
                entry = logged.get(at)
                if entry is not None:
                    image = pf._logged_image(entry)
                    lo, hi = max(at, offset), min(at + len(image), offset + length)
                    data[lo - offset:hi - offset] = image[lo - at:hi - at]
        return bytes(data)
    return read


def _snapshot_reader(pf):
    """(Reader) ``read(offset, length)``: the bytes of this open's snapshot (its map)."""
    mapping = pf.mapping

    def read(offset, length):
        parts = []
        while length:
            segment = mapping.segment_of(offset)
            take = min(length, segment.start + segment.length - offset)
            parts.append(bytes(mapping.view(offset, take)))
            offset += take
            length -= take
        return b"".join(parts)
    return read


def _write(fd, data, offset):
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _publish(temporary, target):
    """Give the finished copy its name; FileExistsError if a file appeared there meanwhile."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"backup target {target!r} appeared during the backup; "
                              "the copy was not kept", target) from None
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, f"backup target {target!r} exists", target) from None
        os.rename(temporary, target)
        return
    os.unlink(temporary)


