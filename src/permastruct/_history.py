"""The history file of a store that keeps undo history: the records the log held, kept past its reset.

A :class:`HistoryFile` is ``<store>-history`` (layout in :mod:`._format`,
"History file").  Each record is one transaction's undo information: its
id, commit time, metadata, the bytes it changed, the root state before it
and the image before it of every unit it changed.  The engine
(:mod:`._commit`) appends the records of the transactions a checkpoint
copied out of the log, fsyncs, and only then starts the log over; it knows
nothing of pages or objects.
"""

import os
import zlib

from . import _format as F
from ._mapping import FileIO
from .errors import NotAStorageError

__all__ = ["HistoryFile", "HistoryFiles", "Record", "bytes_before"]


class Record:
    """One transaction's undo information (from the log or from the history file).

    ``images`` are ``(file offset, source)``: the unit's image before the
    transaction, or where to read it (:meth:`HistoryFile.image`, or the log's
    ``page_data``)."""

    __slots__ = ("txn", "time", "size", "meta", "root", "images", "where", "load", "freed")

    def __init__(self, txn, time, size, meta, root, images, where, load, freed=()):
        self.txn, self.time, self.size, self.meta, self.root, self.images = txn, time, size, meta, root, images
        #: the offsets of the objects the transaction freed (an undo kills the proxies of objects
        #: made since at those places)
        self.freed = freed
        #: "log", "file" (positions in the history file) or "memory" (the images are bytes)
        self.where = where
        #: ``load(source)``: the image of one of ``images``
        self.load = load


def bytes_before(chain, offset, size, current, unit):
    """The ``size`` bytes at file offset ``offset`` as they were just before the first transaction
    of ``chain`` (undo records, oldest first; empty: the state now), or None where they cannot be
    read.

    Each ``unit``-sized unit they cross comes from the oldest before-image of
    it in the chain (what ``undo()`` would restore), else from
    ``current(offset, size)``: the state after the last transaction, which
    the chain did not change there (bytes, or None outside it).
    """
    images = {}
    for record in reversed(chain):  # newest first: the oldest image of each unit is the last written
        for at, source in record.images:
            images[at] = (record, source)
    parts = []
    at, end = offset, offset + size
    while at < end:
        base = at // unit * unit
        stop = min(end, base + unit)
        found = images.get(base)
        if found is not None:
            record, source = found
            part = bytes(record.load(source))[at - base:stop - base]
        else:
            part = current(at, stop - at)
        if part is None or len(part) != stop - at:
            return None
        parts.append(bytes(part))
        at = stop
    return b"".join(parts)


class HistoryFile:
    """The history file beside a store (see the module documentation)."""

    def __init__(self, io, unit, store_id):
        self.io, self.unit, self.store_id = io, unit, store_id
        self.records = []
        self.end = F.HISTORY_HEADER.size

    @staticmethod
    def path_for(store_path):
        return os.path.realpath(store_path) + F.HISTORY_SUFFIX

    @classmethod
    def open(cls, path, unit, store_id, readonly, create=False):
        """Open and read the history file at ``path``; None when there is none (or, read-only, when
        it is not this store's).  A writer makes a foreign one anew, empty, and (``create``) a
        missing one, its name made durable."""
        created = False
        try:
            io = FileIO.open(path, readonly=readonly, create=False)
        except FileNotFoundError:
            if readonly or not create:
                return None
            io, created = FileIO.open(path, readonly=False, create=True), True
        history = cls(io, unit, store_id)
        try:
            if not history._read():
                if readonly:
                    io.close()
                    return None
                head = io.pread(len(F.HISTORY_MAGIC), 0)
                if head not in (b"", F.HISTORY_MAGIC, bytes(len(head))):
                    raise NotAStorageError(f"{path!r} is not a permastruct history file, but a store's history "
                                           "must have that name: move that file away (it was not changed)")
                history.restart([])
            if created:
                io.fsync_directory()
        except BaseException:
            io.close()
            raise
        return history

    def restart(self, packed):
        """(Writer) Make the file a history of this store holding ``packed`` (``[(record, its
        bytes)]``), fsynced."""
        self.io.truncate(0)
        self.io.pwrite(F.pack_history_header(self.unit, self.store_id) + b"".join(data for _, data in packed), 0)
        self.io.fsync()
        self._read()

    def _read(self):
        """Read the records; False when the file is not a history of this store with this unit."""
        size = self.io.size()
        head = self.io.pread(F.HISTORY_HEADER.size, 0)
        if len(head) < F.HISTORY_HEADER.size:
            return False
        magic, version, unit, store_id, crc = F.HISTORY_HEADER.unpack(head)
        if (magic != F.HISTORY_MAGIC or version != F.HISTORY_VERSION or crc != zlib.crc32(head[:60])
                or unit != self.unit or store_id != self.store_id):
            return False
        records, position, previous = [], F.HISTORY_HEADER.size, 0
        fixed = F.HISTORY_RECORD.size + F.COMMIT.size
        while position + fixed <= size:
            head = self.io.pread(fixed, position)
            magic, count, txn, stamp, changed, meta_length, freed_count = F.HISTORY_RECORD.unpack_from(head)
            if magic != F.HISTORY_RECORD_MAGIC or txn <= previous:
                break
            length = fixed + meta_length + 8 * freed_count + count * (8 + self.unit) + 4
            if position + length > size:
                break
            data = self.io.pread(length, position)
            if len(data) != length or F.UINT32.unpack_from(data, length - 4)[0] != zlib.crc32(data[:-4]):
                break
            page_count, free_head, *slots = F.COMMIT.unpack_from(data, F.HISTORY_RECORD.size)
            at = fixed
            meta = bytes(data[at:at + meta_length])
            at += meta_length
            offsets = memoryview(data)[at:at + 8 * count].cast("Q").tolist()
            at += 8 * count
            freed = tuple(memoryview(data)[at:at + 8 * freed_count].cast("Q").tolist())
            at += 8 * freed_count
            images = [(offset, position + at + index * self.unit) for index, offset in enumerate(offsets)]
            records.append(Record(txn, stamp, changed, meta, (page_count, free_head, slots), images, "file",
                                  self.image, freed))
            previous, position = txn, position + length
        self.records, self.end = records, position
        return True

    def image(self, position):
        data = self.io.pread(self.unit, position)
        if len(data) != self.unit:
            raise OSError(f"{self.io.path!r} is shorter than it was when it was read")
        return data

    @staticmethod
    def pack(record, images):
        """The bytes of ``record`` whose images are the bytes ``images`` (in its order)."""
        page_count, free_head, slots = record.root
        parts = [F.HISTORY_RECORD.pack(F.HISTORY_RECORD_MAGIC, len(images), record.txn, record.time, record.size,
                                       len(record.meta), len(record.freed)),
                 F.COMMIT.pack(page_count, free_head, *slots), record.meta,
                 b"".join(F.UINT64.pack(offset) for offset, _ in record.images),
                 b"".join(F.UINT64.pack(offset) for offset in record.freed)] + list(images)
        body = b"".join(parts)
        return body + F.UINT32.pack(zlib.crc32(body))

    def append(self, packed):
        """Append records (``[(record, its bytes)]``) after the last one, fsync, and read them back
        as the file's (their images then come from the file)."""
        if not packed:
            return
        at = self.end
        self.io.pwrite(b"".join(data for _, data in packed), at)
        self.io.fsync()
        self._read()

    def close(self):
        self.io.close()


class HistoryFiles:
    """The two history files of a store, ``<store>-history`` and ``<store>-history2``.

    Records are appended to the *current* one (the one whose last record is
    newer).  When most of its records are older than what is kept, the other
    one is started over with the kept records and the new ones, fsynced, and
    becomes current: at every moment one of them holds every kept record
    (a crash while the other is rewritten leaves the current one whole).
    Reading takes the records of both, by transaction.
    """

    #: The other file is started over when the current one holds more records the history no longer
    #: keeps than it keeps, and more than this many.
    slack = 32

    def __init__(self, path, files):
        self.path = path
        self.files = files
        newest = [file.records[-1].txn if file is not None and file.records else 0 for file in files]
        self.current = 1 if newest[1] > newest[0] else 0

    @staticmethod
    def path_for(store_path):
        """The first history file's name for the store at ``store_path``."""
        return os.path.realpath(store_path) + F.HISTORY_SUFFIX

    @staticmethod
    def names(path):
        return [path, path + "2"]

    @classmethod
    def exist(cls, path):
        return any(os.path.lexists(name) for name in cls.names(path))

    @classmethod
    def open(cls, path, unit, store_id, readonly):
        """The history files at ``path`` (a writer creates the first one); None when a reader finds none."""
        files = []
        try:
            for index, name in enumerate(cls.names(path)):
                files.append(HistoryFile.open(name, unit, store_id, readonly, create=index == 0))
        except BaseException:
            for file in files:
                if file is not None:
                    file.close()
            raise
        if not any(files):
            return None
        return cls(path, files)

    @property
    def sync_failed(self):
        """Whether an fsync of either file failed (then the store's open refuses to commit)."""
        return any(file is not None and file.io.sync_failed for file in self.files)

    def records(self):
        """Every record of both files, in transaction order (the current file's for a transaction
        both hold)."""
        found = {}
        for index in (1 - self.current, self.current):
            file = self.files[index]
            if file is not None:
                found.update((record.txn, record) for record in file.records)
        return [found[txn] for txn in sorted(found)]

    def append(self, packed, keep_from):
        """Add ``packed`` (``[(record, its bytes)]``, newer than every record) durably; records older
        than ``keep_from`` may be dropped."""
        if not packed:
            return
        current = self.files[self.current]
        dead = sum(1 for record in current.records if record.txn < keep_from)
        live = [record for record in self.records() if record.txn >= keep_from]
        if dead <= max(len(live), self.slack):
            current.append(packed)
            return
        other = 1 - self.current
        if self.files[other] is None:
            self.files[other] = HistoryFile.open(self.names(self.path)[other], current.unit, current.store_id,
                                                 False, create=True)
        kept = [(record, self.pack_record(record)) for record in live]
        self.files[other].restart(kept + list(packed))
        self.current = other

    @staticmethod
    def pack_record(record):
        """The bytes of ``record`` in a history file (its images loaded)."""
        return HistoryFile.pack(record, [record.load(source) for _, source in record.images])

    def close(self):
        for file in self.files:
            if file is not None:
                file.close()
