"""The write-ahead log of a store: append commits, find the whole ones again, reset.

A :class:`Journal` is the file ``<store>-wal`` (layout in :mod:`._format`,
"Write-ahead log").  It knows nothing about pages or objects: a commit is a
list of ``(file offset, unit bytes)`` page images plus the root state
``(page_count, free_head, slots)``.  :class:`permastruct.pages.PageFile`
decides when to commit, when to checkpoint and what readers may see.
"""

import os
import struct
import zlib

from . import _format as F
from ._mapping import FileIO
from .errors import NotAStorageError

#: Bytes read at a time while scanning the log: the first read, and the most.
_FIRST_READ = 1 << 16
_CHUNK = 1 << 22
#: A small commit that runs past the end of the log file grows the file to a
#: multiple of this, with zeros written (not merely allocated) after its
#: frames: later commits then overwrite blocks the file already has, and an
#: ``fdatasync`` need not also write the file's new size (which doubles its
#: cost on ext4).  Commits larger than this grow the file by what they write.
GROW_STEP = 1 << 20


class Commit:
    """One whole transaction found in (or appended to) the log."""

    __slots__ = ("txn", "page_count", "free_head", "slots", "frames", "end", "chain", "freed", "meta", "history")

    def __init__(self, txn, page_count, free_head, slots, frames, end, chain, freed=(), meta=b"", history=None):
        self.txn = txn
        self.page_count = page_count
        self.free_head = free_head
        self.slots = slots
        #: ``(file offset, log position of the page's data)`` in log order.
        self.frames = frames
        #: Log position just after the commit frame.
        self.end = end
        #: The checksum of its commit frame: it names this commit in this history (a checkpoint
        #: writes it into the main file's root record, the next log's header repeats it).
        self.chain = chain
        #: The offsets of the objects the transaction freed.
        self.freed = freed
        #: The transaction's metadata (``_format.pack_txn_meta``; empty when none was given).
        self.meta = meta
        #: (Version 4, a store with history) ``(root before, bytes changed, [(file offset, log
        #: position of the unit's image before the transaction)])``; None when not kept.
        self.history = history

    @property
    def root(self):
        return self.page_count, self.free_head, list(self.slots)


def _frame_crc(header28, data, previous):
    """A frame's checksum, chained: it starts from the previous frame's (the salt for the first)."""
    return zlib.crc32(data, zlib.crc32(header28, previous))


class Journal:
    """The log file beside a store; ``commits`` are the whole transactions after ``base``."""

    def __init__(self, io, unit, identity=(0, 0, 0)):
        self.io = io
        self.unit = unit
        self.salt = 0
        self.base = 0
        #: The format version of the log's frames (its header's; a new or reset log: WAL_VERSION).
        self.version = F.WAL_VERSION
        #: The store's id and its main file's device and inode (a log written before they
        #: were recorded has zeros).
        self.store_id, self.device, self.inode = identity
        #: The chain value of the commit the main file held at ``base`` (0: unknown).
        self.base_chain = 0
        #: The log file's size as this process last wrote or read it.
        self.file_size = 0
        self.commits = []
        self.end = F.WAL_HEADER.size
        #: The checksum of the last frame of the last whole commit (the salt when there is none).
        self.chain = 0
        #: Whether the file holds a valid header (False: nothing in it counts).
        self.valid = False
        #: Whether the log's name is known to be on disk (its directory synced since it was created).
        self.name_durable = True
        #: Whether :meth:`reset` took a new state that its header does not show yet (see there).
        self.header_pending = False
        #: Whether the last :meth:`append` wrote its commit frame whole (then an undo must kill it).
        self.written_commit = False

    @staticmethod
    def path_for(store_path):
        """The log's own name for the store at ``store_path`` (its real path, symlinks resolved)."""
        return os.path.realpath(store_path) + F.WAL_SUFFIX

    def continues(self, txn, chain):
        """Whether this log continues the history of a main file that holds ``txn`` with ``chain``:
        it starts there, or one of its commits is that one.  Zeros (not recorded) pass."""
        if not self.base_chain or not chain:
            return True
        if self.base == txn:
            return self.base_chain == chain
        return any(commit.txn == txn and commit.chain == chain for commit in self.commits)

    @classmethod
    def open(cls, path, readonly, unit):
        """Open the log at ``path`` and read it, or return None when there is none.

        Something at the log's name that is not a log (a FIFO, another
        program's file) is refused with NotAStorageError and never written.
        """
        try:
            io = FileIO.open(path, readonly=readonly, create=False)
        except FileNotFoundError:
            return None
        journal = cls(io, unit)
        try:
            journal._refuse_foreign()
            journal.read()
        except BaseException:
            io.close()
            raise
        return journal

    @classmethod
    def create(cls, path, unit, base, base_chain, identity):
        """Create an empty log at ``path`` whose base is transaction ``base`` (not synced: see
        make_durable); ``identity``: the store id and the main file's device and inode."""
        try:
            io = FileIO.open(path, readonly=False, create=True)
            exists = False
        except FileExistsError:
            io = FileIO.open(path, readonly=False, create=False)
            exists = True
        journal = cls(io, unit, identity)
        journal.name_durable = False
        try:
            if exists:
                journal._refuse_foreign()
            journal.reset(base, base_chain, truncate=True)
        except BaseException:
            io.close()
            if not exists:  # a log that never got its header is no log: leave nothing behind
                FileIO.unlink(path)
            raise
        return journal

    def _refuse_foreign(self):
        """Raise NotAStorageError unless the file is a log: empty, or starting with the log's
        magic, or with a zero header (a log whose first header never reached the disk)."""
        head = self.io.pread(F.WAL_HEADER.size, 0)
        if head and head[:len(F.WAL_MAGIC)] != F.WAL_MAGIC and any(head):
            raise NotAStorageError(
                f"{self.io.path!r} is not a permastruct log, but a store's log must have that name: "
                "move that file away (it was not changed)")

    # -- reading ---------------------------------------------------------------
    def read(self):
        """Find the whole commits: stop at the first frame that is torn, stale or out of order."""
        self.commits = []
        self.end = F.WAL_HEADER.size
        self.valid = False
        self.file_size = size = self.io.size()
        head = self.io.pread(F.WAL_HEADER.size, 0)
        if len(head) < F.WAL_HEADER.size:
            return
        magic, version, unit, salt, base, store_id, base_chain, device, inode, crc = F.WAL_HEADER.unpack(head)
        if (magic != F.WAL_MAGIC or crc != zlib.crc32(head[:60]) or not 1 <= version <= F.WAL_VERSION
                or unit < 512 or unit > 1 << 20 or unit & (unit - 1)):
            return
        self.valid = True
        self.unit, self.salt, self.base, self.version = unit, salt, base, version
        self.store_id, self.base_chain, self.device, self.inode = store_id, base_chain, device, inode
        self.chain = chain = salt
        frame_size = F.FRAME.size
        chunk, chunk_at = b"", 0
        position = F.WAL_HEADER.size
        txn = base + 1
        frames = []
        history, before = None, []
        # Reads start small and double: the file may be much longer than its live
        # frames (its space is reused after a reset), and readers read it often.
        read_size = _FIRST_READ
        while position + frame_size <= size:
            if position + frame_size > chunk_at + len(chunk):
                chunk_at, chunk = position, self.io.pread(min(read_size, size - position), position)
                read_size = min(2 * read_size, _CHUNK)
            local = position - chunk_at
            header = chunk[local:local + frame_size]
            kind, frame_salt, frame_txn, where, length, crc = F.FRAME.unpack(header)
            if frame_salt != salt or frame_txn != txn:
                break
            if kind == F.FRAME_PAGE or (kind == F.FRAME_BEFORE and version > 3):
                whole = length == unit
            elif kind == F.FRAME_HISTORY and version > 3:
                whole = length == F.HISTORY_ENTRY.size and history is None and not frames and not before
            else:  # a commit: its root state, and (version 2) the offsets of the objects it freed
                whole = kind == F.FRAME_COMMIT and (length == F.COMMIT.size or (
                    version == 2 and length > F.COMMIT.size and (length - F.COMMIT.size) % 8 == 0) or (
                    version > 2 and length >= F.COMMIT.size + F.COMMIT_TAIL.size))
            if not whole or position + frame_size + length > size:
                break
            data_at = position + frame_size
            if data_at + length > chunk_at + len(chunk):
                chunk_at, chunk = data_at, self.io.pread(min(max(read_size, length), size - data_at), data_at)
                read_size = min(2 * read_size, _CHUNK)
            data = chunk[data_at - chunk_at:data_at - chunk_at + length]
            if len(data) != length or _frame_crc(header[:28], data, chain) != crc:
                break
            chain = crc
            position = data_at + length
            if kind == F.FRAME_PAGE:
                if where % unit:
                    break
                frames.append((where, data_at))
                continue
            if kind == F.FRAME_HISTORY:
                page_count, free_head, *rest = F.HISTORY_ENTRY.unpack_from(data)
                history = ((page_count, free_head, rest[:F.ROOT_SLOTS]), rest[F.ROOT_SLOTS])
                continue
            if kind == F.FRAME_BEFORE:
                if where % unit or history is None or frames:
                    break
                before.append((where, data_at))
                continue
            if where != len(frames):
                break
            page_count, free_head, *slots = F.COMMIT.unpack_from(data)
            freed, meta = (), b""
            if length > F.COMMIT.size and version == 2:
                freed = memoryview(data)[F.COMMIT.size:].cast("Q").tolist()
            elif length > F.COMMIT.size:  # (version 3) the tail says what follows
                count, meta_length = F.COMMIT_TAIL.unpack_from(data, F.COMMIT.size)
                at = F.COMMIT.size + F.COMMIT_TAIL.size + 8 * count
                if at + meta_length != length:
                    break
                freed = memoryview(data)[F.COMMIT.size + F.COMMIT_TAIL.size:at].cast("Q").tolist()
                meta = bytes(data[at:])
            kept = None if history is None else (history[0], history[1], before)
            self.commits.append(Commit(txn, page_count, free_head, slots, frames, position, chain, freed, meta, kept))
            self.end = position
            self.chain = chain
            frames = []
            history, before = None, []
            txn += 1

    @property
    def last_txn(self):
        return self.commits[-1].txn if self.commits else self.base

    def page_data(self, position):
        """The page image whose data starts at log ``position``."""
        data = self.io.pread(self.unit, position)
        if len(data) != self.unit:
            raise OSError(f"{self.io.path!r} is shorter than it was when it was read")
        return data

    def latest_frames(self, after, upto):
        """``{file offset: log position}`` of the newest image of each page in transactions ``after < txn <= upto``."""
        latest = {}
        for commit in self.commits:
            if after < commit.txn <= upto:
                latest.update(commit.frames)
        return latest

    # -- writing ---------------------------------------------------------------
    def append(self, txn, pages, root, sync, freed=(), meta=b"", history=None):
        """Append transaction ``txn`` (``pages``: ``(offset, unit bytes)``) and its commit frame.

        ``freed``: the offsets of the objects the transaction freed; ``meta``:
        its metadata (bytes; dropped in a log of version 1 or 2, see ``_format``);
        ``history``: ``(root before, bytes changed, [(offset, unit image before)])``,
        written as a history frame and before-image frames first (dropped in a
        log of a version before 4: the commit then keeps no history).

        Frames go out in a few large writes; with ``sync`` the log is synced
        before this returns.  Returns the :class:`Commit`.  The space is
        reserved first (a full disk fails before anything is written), and
        the in-memory state changes only at the end.  If this raises after
        the commit frame was written, the caller undoes the commit: it puts
        ``commits``, ``end`` and ``chain`` back and calls :meth:`invalidate`.
        """
        self.written_commit = False
        if self.header_pending:
            self._write_header()
        salt, unit, chain = self.salt, self.unit, self.chain
        pack = F.FRAME.pack
        frames = []
        position = self.end
        if self.version < 4:
            history = None
        extra, before = [], []
        if history is not None:
            (before_count, before_head, before_slots), size, images = history
            extra.append((F.FRAME_HISTORY, 0, F.HISTORY_ENTRY.pack(before_count, before_head, *before_slots, size)))
            position += F.FRAME.size + F.HISTORY_ENTRY.size
            for offset, image in images:
                extra.append((F.FRAME_BEFORE, offset, image))
                before.append((offset, position + F.FRAME.size))
                position += F.FRAME.size + unit
        for offset, _ in pages:
            frames.append((offset, position + F.FRAME.size))
            position += F.FRAME.size + unit
        page_count, free_head, slots = root
        body = F.COMMIT.pack(page_count, free_head, *slots)
        if self.version < 3:
            meta = b""
            if freed and self.version == 2:
                body += struct.pack(f"<{len(freed)}Q", *freed)
        elif freed or meta:
            body += F.COMMIT_TAIL.pack(len(freed), len(meta)) + struct.pack(f"<{len(freed)}Q", *freed) + meta
        position += F.FRAME.size + len(body)
        padded = position
        if position > self.file_size and position - self.end < GROW_STEP:
            padded = -(-position // GROW_STEP) * GROW_STEP
        if padded > self.file_size:
            self.io.fallocate(self.file_size, padded - self.file_size)
        batch = []
        batch_bytes = 0
        write_at = self.end
        for kind, offset, data in extra + [(F.FRAME_PAGE, offset, data) for offset, data in pages]:
            header = pack(kind, salt, txn, offset, len(data), 0)[:28]
            chain = _frame_crc(header, data, chain)
            batch.append(header)
            batch.append(F.UINT32.pack(chain))
            batch.append(data)
            batch_bytes += F.FRAME.size + len(data)
            if batch_bytes >= _CHUNK:
                data = b"".join(batch)
                self.io.pwrite(data, write_at)
                write_at, batch, batch_bytes = write_at + len(data), [], 0
        header = pack(F.FRAME_COMMIT, salt, txn, len(frames), len(body), 0)[:28]
        chain = _frame_crc(header, body, chain)
        batch += [header, F.UINT32.pack(chain), body]
        whole = position - write_at  # bytes of this last write up to the end of the commit frame
        if padded > position:
            batch.append(bytes(padded - position))  # dead frames: their salt and txn are zero
        # From here on the commit frame may be on disk, whatever cuts this short: an
        # interrupt can land on any bytecode, the jump past a handler too, so the flag is
        # set before the write and cleared only by a failed write that says it did not get there.
        self.written_commit = True
        try:
            self.io.pwrite(b"".join(batch), write_at)
        except OSError:  # the write failed: FileIO says how much of it is on disk
            self.written_commit = self.io.written >= whole
            raise
        if sync:
            self.io.fsync()
        kept = None if history is None else (history[0], history[1], before)
        commit = Commit(txn, page_count, free_head, list(slots), frames, position, chain, tuple(freed), meta, kept)
        self.commits.append(commit)  # the caller's undo (Engine) truncates it again
        self.end, self.chain, self.file_size = position, chain, max(self.file_size, padded)
        return commit

    def invalidate(self, position, sync):
        """Make the frames from ``position`` on dead on disk (a commit written there is undone).

        The first frame header at ``position`` is zeroed: recovery stops
        before it, and a later commit written at ``position`` overwrites the
        rest.  Nothing to do when the last :meth:`append` never wrote its
        commit frame whole (without it, recovery never takes the frames
        before), or past the end of the file.
        """
        if self.written_commit and position + F.FRAME.size <= self.io.size():
            self.io.pwrite(bytes(F.FRAME.size), position)
            if sync:
                self.io.fsync()

    def reset(self, base, base_chain, truncate=False):
        """Start the log again after a checkpoint: a new salt, nothing in it, ``base`` = ``txn``.

        The new state is taken in memory first, in one step, and the header
        written after: if that write does not happen (an exception, a failed
        write), ``header_pending`` says so and the next :meth:`append` writes
        it before any frame.  Until then the file keeps the old header, whose
        commits the main file already holds.
        """
        salt = self.salt
        while salt == self.salt:
            salt = int.from_bytes(os.urandom(4), "little")
        self.salt, self.base, self.base_chain, self.commits, self.end, self.chain, self.valid, self.header_pending = (
            salt, base, base_chain, [], F.WAL_HEADER.size, salt, True, True)
        self.version = F.WAL_VERSION
        self._write_header()
        if truncate and self.io.size() > F.WAL_HEADER.size:
            try:
                self.io.truncate(F.WAL_HEADER.size)
                self.file_size = F.WAL_HEADER.size
            except OSError:
                pass  # only space is lost: frames after the header are dead under the new salt

    def _write_header(self):
        self.io.pwrite(F.pack_wal_header(self.unit, self.salt, self.base, self.store_id, self.base_chain,
                                         self.device, self.inode), 0)
        self.file_size = max(self.file_size, F.WAL_HEADER.size)
        self.header_pending = False

    def make_durable(self):
        """fsync the log, and its directory the first time, so that what it holds survives a power loss."""
        self.io.fsync()
        if not self.name_durable:
            self.io.fsync_directory()
            self.name_durable = True

    def size(self):
        return self.end

    def remove(self):
        """Delete the log file and close it (a clean close of a store whose main file holds every commit)."""
        FileIO.unlink(self.io.path)
        self.io.close()

    def close(self):
        self.io.close()
