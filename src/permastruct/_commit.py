"""The transaction engine: a store's main file and its log, commits, checkpoints, readers.

:class:`Engine` owns everything that makes changes atomic and durable and
lets one writer and many readers share a file.  It knows the file as a
header block, pages of ``page_size`` bytes and a root state ``(page_count,
free_head, slots)``; it knows nothing of what the pages hold (the page layer,
:mod:`permastruct.pages`, and the object layers above it do).  The byte
layout of the header, root records, log frames and lock bytes is in
:mod:`permastruct._format`.

Theory of operation
===================

*State.*  A writer maps the main file privately (:class:`~._mapping.MappedFile`):
its stores stay in its own memory.  The root state of the last commit is
``_committed``; ``txn`` is that commit's number and ``main_txn`` the newest
one the main file itself holds (its valid root record with the higher
number, ``_current_root`` says which of the two).  Commits after
``main_txn`` are in the log; ``_logged`` maps each log unit they changed to
its newest image (kept in memory for small commits, else its position in
the log).

*Commit* (:meth:`Engine.commit`): the changed units are the private pages of
the map whose bytes differ from their committed image; they are appended to
the log as page frames, then one commit frame with the new root state, and
(with ``sync``) the log is fsynced.  The commit frame is the point of no
return: recovery accepts a transaction only with its commit frame.  Until
the commit has been published in memory, any exception (an interrupt at any
bytecode, a MemoryError, a failed write) undoes it: the commit frame is
overwritten on disk and the in-memory state put back, so a commit that
raised is never found again, by this process or by recovery.

*Fresh pages* (:meth:`Engine._write_fresh`): a durable commit whose units
past every page any readable state has (the main file's root, every commit
in the log, the last commit) add up to ``fresh_bytes`` writes those straight
into the main file and fsyncs it before its commit frame; the map drops its
private copies of them.  No reader or recovery reads there until the commit
frame names them, so a crash before it leaves them unused past the end.  A
big load is written once, not through the log and again at the checkpoint.
A commit with ``durable=False`` (the open that grows the schema) syncs
nothing; the next durable commit, or checkpoint, first syncs what it left.

*Checkpoint* (:meth:`Engine.checkpoint`): copies the newest image of every
logged unit of transactions up to ``target`` into the main file, fsyncs,
writes the root record that does not hold ``main_txn`` (so a torn write
leaves the other, whose log is still there), fsyncs again, and only then
records the new ``main_txn`` and, when everything is in, starts the log over
(a new salt).  Each step leaves a file that recovery reads correctly, and
the in-memory state changes only after the disk does; an exception in
between leaves a checkpoint to do again, never a wrong state.  ``target`` is
the oldest transaction a reader still reads (its reader lock): a reader
reads every unit the log does not give it from the main file.

*Readers* map the file privately too, take the checkpoint lock shared while
they read the root record and the log (so no checkpoint writes the main
file meanwhile), lay the log's units of their snapshot over their map, and
hold a shared lock on ``LOCK_READERS + txn`` while they keep that snapshot.

*Close* commits what is pending, checkpoints, and removes the log when the
main file holds every commit and no reader is taking a snapshot; then it
truncates the file's free end past the last commit's page count
(:meth:`Engine._shrink_file`).

*Creation* writes the header block into a file without a name, syncs it and
links it at the store's path, or (an existing empty file) writes it with the
magic last: a file with the magic always has a whole header block.

*Modes* (``mode``; ``docs/modes.rst``) are commit policies; everything above
is the ``"file"`` one.  ``"memory"`` (``Engine(None)``): the main file is an
anonymous in-memory file (:meth:`~._mapping.FileIO.memory`) with no log and
no locks; a commit writes the changed pages into it in place, after copying
the committed bytes it overwrites, so that an exception (or an
unacknowledged commit) puts them back (:meth:`Engine._commit_in_memory`).
``"overlay"``: the base file is opened read-only and one snapshot of it taken
as a reader does, whose reader locks are held until close; the file is then
an :class:`~._mapping.OverlayIO` (the base below the snapshot's last whole
map unit, memory above), and a commit keeps each changed page's image in
``_logged``, as if logged, with nothing ever checkpointed
(:meth:`Engine._commit_overlay`).  Both undo a commit with the same
:class:`_Undo`, and close by discarding everything.

*History* (``history=N``, root slot ``SLOT_HISTORY``; ``docs/modes.rst``):
a commit whose new root keeps history also writes, before its page frames,
a history frame (the root state before it, the bytes it changes) and the
committed image of each unit it changes, and of each unit it drops off the
end (a lower page count), that some state the history keeps still has
(:meth:`Engine._before_state`); units past every such state need none.
``_records`` holds the last ``N`` transactions' undo records without a gap
(:class:`._history.Record`: images in the log, in the history files, or in
memory for the memory and overlay modes), published with the commit and
put back by its undo.  Before any reset of the log (a checkpoint that copied
everything, an open that found the main file holding the log's commits,
close) the records still in the log are appended to the history files and
fsynced (:meth:`Engine._archive_history`), under the checkpoint lock: the
log is never started over before its history is durable elsewhere, and an
open reads the records (:meth:`Engine._read_records`) before its own
checkpoint.  ``_restore_history(id)`` writes into the map, as pending
changes, the oldest image of every unit the transactions from ``id`` on
changed and takes the root state before ``id``: committing that is the undo,
an ordinary transaction (with its own history).  ``at=`` is an overlay,
read-only, whose snapshot gets the same images laid over it
(:meth:`Engine._past_state`).
"""

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time
import weakref
import zlib

from . import _format as F
from ._history import HistoryFiles, Record
from ._journal import Journal
from ._mapping import GRANULE, OS_PAGE, FileIO, MappedFile, OverlayIO
from .errors import (CorruptStorageError, IncompatibleFormatError, NotAStorageError, OverlayError,
                     ReadOnlyError, StorageClosedError, StorageFullError, StorageLockedError, SyncFailedError,
                     UndoError)

__all__ = ["Engine"]

#: Bytes of the map copied at a time to compare logged pages with their committed images.
_COMPARE_CHUNK = 1 << 20


class Engine:
    """A store's main file, its log and its locks: commits, checkpoints, recovery and snapshots.

    ``Engine(path, page_size)`` creates the file if it is missing or empty and
    opens it otherwise (the page size is then read from the file).  One
    writable open at a time (a second one raises ``StorageLockedError``, or
    waits up to ``timeout`` seconds); any number of ``readonly=True`` opens,
    each seeing the last commit made before it opened or last called
    :meth:`refresh`.  :class:`permastruct.pages.PageFile` is the page layer
    on top of it.
    """

    #: A commit checkpoints the log into the main file when the log is larger than this.
    #: (A reader on an old snapshot holds the checkpoint back; the log grows, the writer never waits.)
    checkpoint_bytes = 4 << 20

    def __init__(self, path, page_size=F.DEFAULT_PAGE_SIZE, *, readonly=False, sync=True,
                 initial_size=None, timeout=0, overlay=False, history=None, at=None):
        #: The commit policy (see the theory of operation): "file", "memory" or "overlay".
        self.mode = "memory" if path is None else "overlay" if overlay or at is not None else "file"
        #: (``at=``) the transaction whose state this read-only open shows
        self._at = at
        check_history(history)
        if at is not None:
            if not readonly or overlay or path is None:
                raise ValueError("at= opens a past state of a store file read-only: pass the path and "
                                 "readonly=True (and not overlay=True)")
            if not isinstance(at, int) or isinstance(at, bool):
                raise TypeError(f"at must be a transaction id (an int), not {type(at).__name__}")
        elif self.mode != "file" and readonly:
            raise ValueError(f"an {'in-memory' if path is None else 'overlay'} store cannot be read-only: "
                             "its changes live in this process only (open the file with readonly=True "
                             "and without overlay to read it)")
        if path is None and overlay:
            raise ValueError("an overlay needs a base file: pass its path (None makes an in-memory store)")
        self.path = "(memory)" if path is None else os.fspath(path)
        if not isinstance(self.path, str):
            raise TypeError(f"file name must be str or os.PathLike, not {type(path).__name__}")
        #: how messages name the store: its path quoted, or (in memory) what the storage sets
        self._label = "<in-memory storage>" if path is None else repr(self.path)
        self.readonly = readonly
        self.sync = sync and self.mode == "file"
        self.closed = True
        self.journal = None
        self._use_journal = self.mode == "file"
        self._logged = {}  # writer: file offset -> [log position, image or None] not yet checkpointed
        self._log_synced = True  # whether the log's last commit was synced (False: durable=False)
        self._log_at_synced = True  # whether the main file's record of the log's path was synced
        self._mark = None  # reader: the transaction whose reader lock this open holds
        self._owner = os.getpid()  # the process whose locks these are (not a forked child)
        self._unacknowledged = None  # the _Undo of a commit its caller has not confirmed yet
        self._undoing = None  # the _Undo of an undo that did not finish
        self._undo_failed = False  # an undo could not write the log: no more commits
        #: The undo records of the retained transactions, oldest first (:class:`._history.Record`)
        self._records = []
        self._history = None  # (file, writer) the history files, once opened
        #: Whether the close cuts the file's free end (:meth:`_shrink_file`): set by a commit that
        #: lowers the page count, and by ``Storage.pack()``.
        self._shrink_at_close = False
        #: ``(start, end)``: file bytes a checkpoint gave back while this writer maps them (a hole;
        #: :meth:`_reserve` fills it again before the page count grows into it), or None.
        self._hole = None
        #: (Reader) the offsets of the objects freed by the commits its last refresh moved past
        self.freed = set()
        #: Whether this open created the store: None, "new" (a new file) or "in place" (an empty file).
        self.created = None
        check_timeout(timeout)
        if self.mode == "memory":
            self._open_memory(page_size)
        elif self.mode == "overlay":
            self._open_overlay(at)
        while self.mode == "file":
            try:
                self.io = FileIO.open(self.path, readonly=readonly, create=False)
            except FileNotFoundError:
                if readonly:
                    raise FileNotFoundError(errno.ENOENT, f"no such store: {self.path!r} (a read-only "
                                            "open cannot create it)", self.path) from None
                if self._create_new(page_size):
                    break
                continue  # another process created it first: open theirs
            try:
                if not readonly:
                    self._lock_writer(timeout)
                if not readonly and self._empty():
                    self._create_in_place(page_size)
                else:
                    self._open()
            except BaseException:
                if self.journal is not None:
                    self.journal.close()
                if getattr(self, "mapping", None) is not None:
                    self.mapping.close()
                self.io.close()
                raise
            break
        if self.mode == "file" and not readonly:
            _WRITERS[self.io.identity()] = self
        self.closed = False
        #: ``(txn, bytes)``: the state this open's map was laid out for and the size it mapped in one
        #: piece (a restored state older than it may need the file mapped again: :meth:`_remap`)
        self._layout = (getattr(self, "txn", 0), self.mapping.size)
        #: Whether the last :meth:`_restore_history` mapped the file again (every proxy must die)
        self._remapped = False
        if not self.readonly:
            try:
                self._load_history(history)
            except BaseException:
                self.abandon()  # (a store this open created goes again)
                raise
        if initial_size and self.created:
            try:
                self.mapping.grow(initial_size)
            except BaseException:
                self.abandon()
                raise

    # -- creating ------------------------------------------------------------
    def _create_new(self, page_size):
        """Create the store at a path where there is no file; False if another process got there first.

        The file is made without a name (or under a temporary one), locked,
        given its header block, synced (whatever ``sync`` says), and only then linked at ``path``: a
        file with the permastruct magic at a store's name always has a whole
        header block, and two processes creating one path never both succeed.
        """
        check_page_size(page_size)
        io = FileIO.create_unnamed(self.path)
        try:
            io.lock(F.LOCK_WRITER, True)  # no one else can know this file yet: granted at once
            io.pwrite(self._header_block(page_size), 0)
            io.fsync()  # even with sync=False: a name must never come back from a power loss without its header
            try:
                io.publish_as(self.path)
            except FileExistsError:
                io.discard_unnamed()
                return False
            if self.sync:
                io.fsync_directory()
        except BaseException:
            if io.fd >= 0 and io.path != self.path:
                io.discard_unnamed()
            elif io.fd >= 0:  # published, then a failure (a failed directory sync): take it back
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                io.close()
            raise
        self.io = io
        self._start_new(page_size, "new")
        return True

    def _empty(self):
        """(Writer, locked) Whether the file holds no store yet: empty, or an unfinished in-place creation.

        :meth:`_create_in_place` writes the header block without the magic
        first and the magic last, so a file it did not finish is at most one
        header block long and starts with eight zero bytes, followed by zeros
        or by a header whose checksum (magic included) holds.
        """
        size = self.io.size()
        if size == 0:
            return True
        if size > F.HEADER_BLOCK:
            return False
        head = self.io.pread(F.HEADER_BLOCK, 0)
        if head[:8] != bytes(8):
            return False
        if not any(head):
            return True
        if len(head) < F.HEADER.size:
            return False
        whole = F.MAGIC + head[8:F.HEADER.size]
        return F.UINT32.unpack_from(whole, 60)[0] == zlib.crc32(whole[:60])

    def _create_in_place(self, page_size):
        """Make a store of an existing empty file (``tempfile.mkstemp()``), under the writer lock."""
        check_page_size(page_size)
        block = self._header_block(page_size)
        self.io.pwrite(block[len(F.MAGIC):], len(F.MAGIC))
        self.io.fsync()  # even with sync=False: the magic must never reach the disk before the rest
        self.io.pwrite(block[:len(F.MAGIC)], 0)
        self._start_new(page_size, "in place")

    def _header_block(self, page_size):
        """The first ``HEADER_BLOCK`` bytes of a new store: the static header (with a new random
        store id) and root record A."""
        self.store_id = int.from_bytes(os.urandom(8), "little") or 1
        block = bytearray(F.HEADER_BLOCK)
        block[:F.HEADER.size] = F.pack_header(page_size, store_id=self.store_id)
        block[F.ROOT_OFFSETS[0]:F.ROOT_OFFSETS[0] + F.ROOT.size] = F.pack_root(1, 0, F.NO_NEXT_FREE_PAGE,
                                                                               [0] * F.ROOT_SLOTS)
        return bytes(block)

    def _start_new(self, page_size, how):
        """The state of a store just created: transaction 1, no pages."""
        self.created = how
        self.page_size = page_size
        self._main_chain, self._log_at = 0, None
        self.txn = self.main_txn = 1
        self.page_count, self.free_head = 0, F.NO_NEXT_FREE_PAGE
        self.slots = [0] * F.ROOT_SLOTS
        self._committed = (0, F.NO_NEXT_FREE_PAGE, list(self.slots))
        self._current_root = 0
        self.mapping = MappedFile(self.io, False, F.HEADER_BLOCK, page_size)

    # -- the in-memory and overlay modes ---------------------------------------------
    def _open_memory(self, page_size):
        """(Memory) A new store in an anonymous in-memory file (:meth:`FileIO.memory`): no name, no
        log, no locks; the kernel frees it when this open closes or the process dies."""
        check_page_size(page_size)
        self.io = FileIO.memory()
        try:
            self.io.pwrite(self._header_block(page_size), 0)
            self._start_new(page_size, "new")
        except BaseException:
            self.io.close()
            raise

    def _open_overlay(self, at=None):
        """(Overlay) Take one committed snapshot of the base file as a reader does, then keep every
        change in memory.

        The base is opened read-only and never written: its pages up to the
        last whole map unit of the snapshot's pages are mapped privately, the
        rest (the snapshot's last partial unit, and all growth) lives in an
        anonymous in-memory file (:class:`OverlayIO`).  With pages smaller
        than a map unit and a snapshot that ends inside one, a page run could
        cross that boundary, so all its pages are copied into memory.  The log's pages of the
        snapshot are laid over the map and kept as committed images.  The
        reader locks of the snapshot are held until close, so the base's
        writer never checkpoints past it (its log grows meanwhile, as for a
        reader that does not refresh).
        """
        base = FileIO.open(self.path, readonly=True, create=False)
        self.io = base
        self.readonly = True  # the snapshot is taken as a reader's
        self._use_journal = True
        try:
            self._lock_snapshot()
            try:
                root = self._read_main()
                pending = self._read_log()
                self._adopt_state(root, pending)
                latest = self.journal.latest_frames(self.main_txn, self.txn) if pending else {}
                images = {offset: self.journal.page_data(position) for offset, position in latest.items()}
                past = self._past_state(at) if at is not None else None
                unit = max(GRANULE, self.page_size)
                end = F.HEADER_BLOCK + self.page_count * self.page_size
                limit = F.HEADER_BLOCK + (end - F.HEADER_BLOCK) // unit * unit
                if limit < end:
                    # Pages smaller than a map unit, and a snapshot that ends inside one: a page run
                    # may cross ``limit``, and nothing here knows where runs begin, so no split of
                    # the pages is safe: all of them go to memory (the header block stays mapped).
                    limit = F.HEADER_BLOCK
                tail = base.pread(F.HEADER_BLOCK + -(-(end - F.HEADER_BLOCK) // unit) * unit - limit, limit)
                self.io = OverlayIO(base, limit, tail)
                if past is not None:  # (the past state mapped in one piece past the base: see _remap)
                    past_end = max([F.HEADER_BLOCK + past[0][0] * self.page_size] +
                                   [offset + OS_PAGE for offset in past[1]])
                    past_end = F.HEADER_BLOCK + -(-(past_end - F.HEADER_BLOCK) // unit) * unit
                    if past_end > self.io.size():
                        self.io.fallocate(self.io.size(), past_end - self.io.size())
                self.mapping = MappedFile(self.io, False, F.HEADER_BLOCK, self.page_size)
                for offset, image in images.items():
                    self.mapping.view(offset, len(image))[:] = image
                    self._logged[offset] = [None, image]
                if past is not None:
                    self._show_past(*past)
                self.io.lock(F.LOCK_READERS + self.txn, False, wait=True)
                self.io.lock(_who_lock(self.txn), False, wait=True)
                self._mark = self.txn
            finally:
                base.unlock(F.LOCK_CHECKPOINT)
                if self.journal is not None:
                    self.journal.close()
                    self.journal = None
        except BaseException:
            if getattr(self, "mapping", None) is not None:
                self.mapping.close()
            self.io.close()
            raise
        self.readonly, self._use_journal = at is not None, False
        self._current_root = 0

    # -- history: undo records, undo, at= ---------------------------------------------
    def _load_history(self, history):
        """(Writer, open) Take ``history`` (None: the stored setting) and the retained undo records.

        A new setting is a pending change of the root state (the storage's open
        commits it).  A file store has read its records (:meth:`_read_records`)
        before its open's checkpoint; an in-memory store or an overlay starts
        with none.  A setting of 0 deletes the history files.
        """
        if history is not None and history != self.slots[F.SLOT_HISTORY]:
            self.slots[F.SLOT_HISTORY] = history
        limit = self.slots[F.SLOT_HISTORY]  # (the setting this open commits)
        if self.mode != "file":
            return
        path = HistoryFiles.path_for(self.path)
        if not limit:
            self._records = []
            if self._history is not None:
                self._history.close()
                self._history = None
            if HistoryFiles.exist(path):  # turned off: what was kept goes
                for name in HistoryFiles.names(path):
                    FileIO.unlink(name)
        elif self._history is None:
            self._read_records(limit)
        else:
            self._records = self._records[-limit:]

    def _read_records(self, limit):
        """(Writer, opening) Read the undo records of the last ``limit`` transactions from the history
        files and the log (before a checkpoint starts the log over: it archives them first)."""
        if not limit:
            return
        self._history = HistoryFiles.open(HistoryFiles.path_for(self.path), OS_PAGE, self.store_id, readonly=False)
        found = {record.txn: record for record in self._history.records() if record.txn <= self.txn}
        if self.journal is not None and self.journal.valid:
            for commit in self.journal.commits:
                if commit.history is not None and commit.txn <= self.txn and commit.txn not in found:
                    found[commit.txn] = self._log_record(commit, self.journal)
        self._records = _kept(found, self.txn, limit)

    @staticmethod
    def _log_record(commit, journal):
        root, size, before = commit.history
        return Record(commit.txn, commit.slots[F.SLOT_TIME], size, commit.meta, root, before, "log",
                      journal.page_data, tuple(commit.freed))

    def _committed_image(self, offset, unit):
        """The committed bytes of the ``unit`` bytes at ``offset`` (zeros past the file's end)."""
        entry = self._logged.get(offset)
        if entry is not None:
            return bytes(self._logged_image(entry))
        data = self.io.pread(unit, offset)
        return data + bytes(unit - len(data))

    def _before_state(self, changed, unit):
        """(A commit, when the new root keeps history) ``(root before, bytes changed, [(offset, image
        before)])`` for the units ``changed``; None without history.

        Images are kept of the changed units and of the units the commit drops
        off the end (a lower page count: the file may be cut there at close)
        that some state the history keeps still has: past every such state's
        page count a unit is never restored (a bulk load costs no images).
        """
        limit = self.slots[F.SLOT_HISTORY]
        if not limit:
            return None
        count, free_head, slots = self._committed
        old_end, new_end = F.HEADER_BLOCK + count * self.page_size, F.HEADER_BLOCK + self.page_count * self.page_size
        high = old_end
        if new_end < old_end or (changed and max(changed) >= old_end):  # (else every unit is below it)
            kept = self._records[len(self._records) - limit + 1:] if limit > 1 else []
            high = F.HEADER_BLOCK + max([count] + [record.root[0] for record in kept]) * self.page_size
        offsets = {offset for offset in changed if offset < high}
        if new_end < old_end:
            offsets.update(range(new_end // unit * unit, min(old_end, high), unit))
        images = [(offset, self._committed_image(offset, unit)) for offset in sorted(offsets)]
        return (count, free_head, list(slots)), len(changed) * unit, images

    def _with_record(self, record):
        """The retained records once ``record`` (of the commit being made; None: it keeps none) is in."""
        limit = self.slots[F.SLOT_HISTORY]
        if not limit or record is None:
            return []
        records = self._records if self._records and self._records[-1].txn == record.txn - 1 else []
        return (records + [record])[-limit:]

    def _archive_history(self, journal):
        """(Writer, before the log starts over) Put the log's undo records into the history files, fsynced.

        Only records of transactions the main file holds reach the log's reset.
        """
        logged = [record for record in self._records if record.where == "log"]
        if not logged:
            return
        if self._history is None:
            self._history = HistoryFiles.open(HistoryFiles.path_for(self.path), OS_PAGE, self.store_id, False)
        packed = [(record, HistoryFiles.pack_record(record)) for record in logged]
        self._history.append(packed, self._records[0].txn)
        found = {record.txn: record for record in self._history.records()}
        self._records = [found.get(record.txn, record) for record in self._records]

    def _history_log(self):
        """The retained undo records, oldest first (a reader: those of its snapshot, read from the
        history files and the log under the snapshot lock; ``at=``: none)."""
        self._check_open()
        if not self.readonly or self.mode != "file":
            return list(self._records)
        limit = self.slots[F.SLOT_HISTORY]
        if not limit:
            return []
        self._lock_snapshot()
        try:
            self._log_at = F.unpack_log_at(self.io.pread(F.HEADER_BLOCK, 0))
            journal = self._find_log(True)
            files = HistoryFiles.open(HistoryFiles.path_for(self.path), OS_PAGE, self.store_id, readonly=True)
            try:
                found = {record.txn: record for record in files.records()} if files is not None else {}
                if journal is not None and journal.valid:
                    for commit in journal.commits:
                        if commit.history is not None:
                            found[commit.txn] = self._log_record(commit, journal)
            finally:
                if files is not None:
                    files.close()
                if journal is not None:
                    journal.close()
        finally:
            self.io.unlock(F.LOCK_CHECKPOINT)
        return _kept(found, self.txn, limit)

    def _history_chain(self, txn):
        """The undo records from transaction ``txn`` to the last commit; UndoError when it cannot be undone."""
        self._check_open()
        if not isinstance(txn, int) or isinstance(txn, bool):
            raise TypeError(f"a transaction id is an int, not {type(txn).__name__}")
        limit = self._committed[2][F.SLOT_HISTORY]
        if not limit:
            raise UndoError(f"{self._label} keeps no history, so transaction {txn} cannot be undone: open it "
                            "with history=N to keep the last N transactions undoable")
        if not 1 <= txn <= self.txn:
            raise UndoError(f"{self._label} has no transaction {txn}: its last commit is transaction {self.txn}")
        records = self._records
        first = records[0].txn if records else self.txn + 1
        if txn < first:
            oldest = f"the oldest it still holds is {first}" if records else "it holds none yet"
            raise UndoError(f"transaction {txn} of {self._label} is no longer in its history (it keeps the last "
                            f"{limit}; {oldest})")
        return records[txn - first:]

    def _restore_history(self, txn):
        """(Writer, nothing pending) Make the pending state the committed state just before transaction
        ``txn``: its root state, and the oldest before-image of every unit the transactions since
        changed.  Returns the undone ids.  Commit to make it a transaction; roll back to forget it."""
        self._check_writable()
        self.settle()
        chain = self._history_chain(txn)
        unit = OS_PAGE
        images = {}
        for record in reversed(chain):  # newest first: the oldest image of each unit is the last written
            for offset, source in record.images:
                images[offset] = (record, source)
        page_count, free_head, slots = chain[0].root
        end = max([F.HEADER_BLOCK + page_count * self.page_size] + [offset + unit for offset in images])
        self._remapped = False
        if self.mode == "file" and txn <= self._layout[0] and end > self._layout[1]:
            self._remap(end)
        elif self.mapping.size < end:
            self.mapping.grow(end)
        self._forget_pages()
        self._reserve(-(-(end - F.HEADER_BLOCK) // self.page_size))  # (a hole a checkpoint left: blocks first)
        for offset, (record, source) in sorted(images.items()):
            self.mapping.view(offset, unit)[:] = record.load(source)
        slots = list(slots)
        slots[F.SLOT_HISTORY] = self.slots[F.SLOT_HISTORY]
        self.page_count, self.free_head, self.slots = page_count, free_head, slots
        return [record.txn for record in chain]

    def _remap(self, end):
        """(Writer, nothing pending) Map the whole file, grown to ``end``, in one piece again.

        A state older than this open (or than the last remap) may have objects
        past what the open mapped in its first segment (the file was cut at a
        close since, or lost growth to a crash), laid out by a map that had no
        segment boundary where this one has: restored into later segments of
        this map, such an object could cross one.  So the old segments are
        retired (kept mapped until close: proxies and views may point into
        them, and every proxy must die: ``_remapped`` says so), the file is
        mapped anew like a reader's (:meth:`~._mapping.MappedFile.extend`), and
        the committed images of the logged units are laid over it.
        """
        unit = max(GRANULE, self.page_size)
        size = F.HEADER_BLOCK + -(-(end - F.HEADER_BLOCK) // unit) * unit
        if self.io.size() < size:
            self.io.fallocate(0, size)
        self._forget_pages()
        self.mapping.extend(force=True)
        for offset, entry in self._logged.items():
            image = self._logged_image(entry)
            self.mapping.view(offset, len(image))[:] = image
        self._layout = (self.txn, self.mapping.size)
        self._remapped = True

    def _past_state(self, at):
        """(``at=``, holding the snapshot lock with the log open) ``(root, {offset: image})`` of the
        state right after transaction ``at``; None when it is the snapshot's."""
        if at == self.txn:
            return None
        if not 1 <= at <= self.txn:
            raise UndoError(f"{self.path!r} has no transaction {at}: its last commit is transaction {self.txn}")
        limit = self.slots[F.SLOT_HISTORY]
        files = HistoryFiles.open(HistoryFiles.path_for(self.path), OS_PAGE, self.store_id, readonly=True)
        try:
            found = {record.txn: record for record in files.records()} if files is not None else {}
            if self.journal is not None and self.journal.valid:
                for commit in self.journal.commits:
                    if commit.history is not None:
                        found[commit.txn] = self._log_record(commit, self.journal)
            kept = _kept(found, self.txn, limit) if limit else []
            if not kept or at < kept[0].txn - 1:
                raise UndoError(f"the state after transaction {at} of {self.path!r} is no longer in its history "
                                f"(it keeps the last {limit} transactions; its last is {self.txn})")
            images = {}
            for record in reversed(kept[at + 1 - kept[0].txn:]):
                for offset, source in record.images:
                    images[offset] = bytes(record.load(source))
            return kept[at + 1 - kept[0].txn].root, images
        finally:
            if files is not None:
                files.close()

    def _show_past(self, root, images):
        """(``at=``) Lay the past state's images over the overlay's map and take its root state."""
        unit = OS_PAGE
        page_count, free_head, slots = root
        end = max([F.HEADER_BLOCK + page_count * self.page_size] + [offset + unit for offset in images])
        if self.mapping.size < end:
            self.mapping.grow(end)
        for offset, image in images.items():
            self.mapping.view(offset, unit)[:] = image
        self.page_count, self.free_head, self.slots = page_count, free_head, list(slots)
        self._committed = (page_count, free_head, list(slots))
        self.txn = self._at

    # -- opening -------------------------------------------------------------
    def _lock_writer(self, timeout):
        """Become the one writer of the file, waiting up to ``timeout`` seconds (None: forever)."""
        if self.io.lock_waiting(F.LOCK_WRITER, True, timeout):
            return
        mine = _WRITERS.get(self.io.identity())
        if mine is not None and not mine.closed and mine._owner == os.getpid():
            waited = f", still after waiting {timeout} s" if timeout else ""
            raise StorageLockedError(f"{self.path!r} is already open for writing in this process "
                                     f"(as {mine.path!r}){waited}; close that storage first, or open this "
                                     "one with readonly=True")
        if timeout:
            raise StorageLockedError(f"{self.path!r} is still open for writing by another process after "
                                     f"waiting {timeout} s; close it there, or open this one with "
                                     "readonly=True")
        raise StorageLockedError(f"{self.path!r} is open for writing by another process; close it there, "
                                 "open this one with readonly=True, or pass timeout= to wait for it")

    def _read_main(self):
        """Check the static header and pick the newer valid root record of the main file."""
        size = self.io.size()
        head = self.io.pread(F.HEADER_BLOCK, 0)
        if len(head) < F.HEADER.size or head[:8] != F.MAGIC:
            raise NotAStorageError(f"{self.path!r} is not a permastruct store (no permastruct magic "
                                   f"at the start of its {size} bytes)")
        magic, version, flags, page_size, block, store_id, crc = F.HEADER.unpack_from(head)
        if version > F.FORMAT_VERSION:
            raise IncompatibleFormatError(f"{self.path!r} {F.version_problem(version)}")
        if crc != zlib.crc32(head[:60]):
            raise CorruptStorageError(f"{self.path!r}: the file header checksum does not match")
        if version < F.FORMAT_VERSION:  # (checked after the checksum: a flipped byte is damage)
            raise IncompatibleFormatError(f"{self.path!r} {F.version_problem(version)}")
        if len(head) < F.HEADER_BLOCK:  # creation writes the whole block before the magic shows
            raise CorruptStorageError(f"{self.path!r} is truncated: {size} bytes, shorter than its header")
        if block != F.HEADER_BLOCK or not _valid_page_size(page_size):
            raise CorruptStorageError(f"{self.path!r}: invalid header block {block} or page size {page_size}")
        self.page_size, self.store_id = page_size, store_id
        roots = [F.unpack_root_chain(head[offset:offset + F.ROOT.size]) for offset in F.ROOT_OFFSETS]
        candidates = [(root[0], index) for index, root in enumerate(roots) if root is not None]
        if not candidates:
            raise CorruptStorageError(f"{self.path!r}: both root records are damaged")
        txn, index = max(candidates)
        if txn >= 1 << 62:
            raise CorruptStorageError(f"{self.path!r}: root record {index} names transaction {txn}, "
                                      "beyond any a store can reach")
        self.main_txn, self._current_root, self._main_chain = txn, index, roots[index][4]
        self._log_at = F.unpack_log_at(head)
        return roots[index][1:4]

    def _read_log(self):
        """The whole commits of the log that the main file lacks (the log is opened afresh)."""
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if not self._use_journal:
            return []
        self.journal = self._find_log(self.readonly)
        if self.journal is None or not self.journal.valid:
            return []
        pending = [commit for commit in self.journal.commits if commit.txn > self.main_txn]
        if pending and pending[0].txn != self.main_txn + 1:
            raise CorruptStorageError(
                f"{self.path!r}: its log starts at transaction {pending[0].txn} but the main file "
                f"holds transaction {self.main_txn}: commits in between are missing")
        # Every page below a commit's page count was written when it was allocated (its
        # header): it is in the main file or in a frame of the log.  A page count past both
        # is a forged or damaged log, and must not make the file grow (to 1 TB, say).
        written = max(0, (self.io.size() - F.HEADER_BLOCK) // self.page_size)
        for commit in pending:
            end = F.HEADER_BLOCK + commit.page_count * self.page_size
            if commit.page_count >= 1 << 40 or not (
                    commit.free_head == F.NO_NEXT_FREE_PAGE or 0 <= commit.free_head < commit.page_count):
                raise CorruptStorageError(f"{self.path!r}: log transaction {commit.txn} has an impossible "
                                          f"root state ({commit.page_count} pages, free head {commit.free_head})")
            for offset, _ in commit.frames:
                if not F.HEADER_BLOCK <= offset < end:
                    raise CorruptStorageError(f"{self.path!r}: log transaction {commit.txn} writes a page at "
                                              f"{offset:#x}, past the end of its {commit.page_count} pages")
                written = max(written, -(-(offset + self.journal.unit - F.HEADER_BLOCK) // self.page_size))
            if commit.page_count > written:
                raise CorruptStorageError(f"{self.path!r}: log transaction {commit.txn} has {commit.page_count} "
                                          f"pages, but the file and the log hold only {written}")
        return pending

    # -- the log's name --------------------------------------------------------------
    def _identity(self):
        """``(store id, device, inode)``: what a log of this store records about it."""
        return (self.store_id,) + self.io.identity()

    def _own_log_path(self):
        return Journal.path_for(self.path)

    def _find_log(self, readonly):
        """The log of this store (read), or None.

        The main file's header block names the log a writer last created (a
        store may be opened through any of its names: hard links, renames);
        that log counts if it records this very file (store id, device and
        inode).  Otherwise the log at this name's own place counts if its store
        id is this store's (a copy of both files is a store too).  Either must
        continue this main file's history (``Journal.continues``): a stale log
        is left alone and not read.  A log of another store at our name is
        refused, for a writer would have to overwrite it.
        """
        own = self._own_log_path()
        identity = self._identity()
        recorded = self._log_at
        for path in ([recorded] if recorded and recorded != own else []) + [own]:
            try:
                journal = Journal.open(path, readonly, OS_PAGE)
            except (NotAStorageError, OSError):
                if path == own:
                    raise
                continue  # a recorded name that is now something else: not our log
            if journal is None:
                continue
            mine = journal.store_id in (0, self.store_id) if path == own else (
                journal.valid and self.store_id and (journal.store_id, journal.device, journal.inode) == identity)
            if path == own and journal.valid and journal.store_id and self.store_id \
                    and journal.store_id != self.store_id and not readonly:
                journal.close()
                raise NotAStorageError(f"{path!r} is the log of another store (id {journal.store_id:#x}, "
                                       f"this one is {self.store_id:#x}): move it away (it was not changed)")
            if not mine:
                journal.close()
                continue
            if journal.valid and journal.base <= self.main_txn and not journal.continues(
                    self.main_txn, self._main_chain):
                journal.valid = False  # a stale log of this store: nothing in it counts
            return journal
        return None

    def log_path(self):
        """The path of this store's log file, or None when it has none (after a clean close)."""
        self._check_open()
        if self.journal is not None:
            return self.journal.io.path
        if not self._use_journal:
            return None
        self._log_at = F.unpack_log_at(self.io.pread(F.HEADER_BLOCK, 0))
        journal = self._find_log(True)
        if journal is None:
            return None
        journal.close()
        return journal.io.path

    def _record_log_path(self, path, sync=True):
        """(Writer, creating its log) Make the main file name the log's path, durably (unless a
        commit without fsyncs creates the log: then before the next durable one), first."""
        if path == self._log_at:
            return
        record = F.pack_log_at(path)
        if record is None:  # too long to record: then only this name finds the log
            record = bytes(F.LOG_AT_RECORD.size)
        self.io.pwrite(record, F.LOG_AT)
        self._log_at_synced = False
        if sync:
            self.io.fsync()
            self._log_at_synced = True
        self._log_at = path

    def _make_log_durable(self, journal, data=True):
        """Sync what commits without fsyncs (``durable=False``) left unsynced: the main file's record
        of the log's path, the log's name and (``data``; a commit's own fsync does it otherwise)
        the log.  Nothing when there is none."""
        if not self._log_at_synced:
            self.io.fsync()
            self._log_at_synced = True
        if not journal.name_durable:
            journal.io.fsync_directory()
            journal.name_durable = True
        if data and not self._log_synced:
            journal.io.fsync()
            self._log_synced = True

    def _adopt_state(self, root, pending):
        """Take the state of the last whole commit and check it against the file."""
        page_count, free_head, slots = pending[-1].root if pending else root
        self.txn = pending[-1].txn if pending else self.main_txn
        unit = max(GRANULE, self.page_size)  # what can be mapped: whole map units
        capacity = (self.io.size() - F.HEADER_BLOCK) // unit * unit // self.page_size
        if page_count > capacity and (self.readonly or not pending):  # a writer regrows what the log names
            raise CorruptStorageError(f"{self.path!r} is truncated: the last commit has {page_count} pages "
                                      f"but the file holds {capacity}" + (
                                          "; open it writable once to recover it" if pending else ""))
        if not (free_head == F.NO_NEXT_FREE_PAGE or 0 <= free_head < page_count):
            raise CorruptStorageError(f"{self.path!r}: free-page list head {free_head} is out of range")
        self.page_count, self.free_head, self.slots = page_count, free_head, list(slots)
        self._committed = (page_count, free_head, list(slots))

    def _apply_log(self, pending):
        """Write the newest image of every logged page into this process's map."""
        if not pending:
            return {}
        latest = self.journal.latest_frames(self.main_txn, pending[-1].txn)
        mapping = self.mapping
        for offset, position in latest.items():
            if offset + self.journal.unit > mapping.size:
                raise CorruptStorageError(f"{self.path!r}: the log holds a page at {offset:#x}, past the "
                                          f"end of the file ({mapping.size:#x} bytes mapped)")
            mapping.write_private(offset, self.journal.page_data(position))
        return latest

    def _lock_snapshot(self):
        """(Reader) Hold the checkpoint lock shared, behind any checkpoint that is waiting for it."""
        self.io.lock(F.LOCK_INTENT, False, wait=True)
        try:
            self.io.lock(F.LOCK_CHECKPOINT, False, wait=True)
        finally:
            self.io.unlock(F.LOCK_INTENT)

    def _lock_checkpoint(self):
        """(Writer) Hold the checkpoint lock exclusively; new readers wait behind this call."""
        self.io.lock(F.LOCK_INTENT, True, wait=True)
        try:
            self.io.lock(F.LOCK_CHECKPOINT, True, wait=True)
        finally:
            self.io.unlock(F.LOCK_INTENT)

    def _open(self):
        if self.readonly:
            self._lock_snapshot()
            try:
                self._take_snapshot()
            finally:
                self.io.unlock(F.LOCK_CHECKPOINT)
            return
        root = self._read_main()
        pending = self._read_log()
        self._adopt_state(root, pending)
        needed = self._covering_size(self.page_count, pending)
        if self.io.size() < needed:  # a crash lost the growth; the missing pages were never written
            self.io.fallocate(0, needed)
        self.mapping = MappedFile(self.io, False, F.HEADER_BLOCK, self.page_size)
        for offset, position in self._apply_log(pending).items():
            self._logged[offset] = [position, None]
        self.mapping.private.clear()  # the writer tracks them in _logged
        self._read_records(self._committed[2][F.SLOT_HISTORY])  # (before the checkpoint archives them)
        if pending:
            self._try_checkpoint()  # if it cannot, the log keeps the commits (and so does the map)
        if self.journal is not None and self.main_txn == self.txn and self.journal.valid:
            # Nothing in the log is needed: start it over under a new salt, so
            # that no frame written before this open can follow the new ones.
            self._lock_checkpoint()  # no reader is reading it meanwhile
            try:
                self._archive_history(self.journal)
            except OSError:
                if self.sync_failed:
                    raise
                # (the history files cannot take them now: the log keeps them, and its commits
                # the main file holds already; the next checkpoint archives them and starts it over)
            else:
                self.journal.reset(self.main_txn, self._main_chain)
            finally:
                self.io.unlock(F.LOCK_CHECKPOINT)

    def _covering_size(self, page_count, commits):
        """The file size that holds ``page_count`` pages and every logged unit, in whole map units."""
        end = F.HEADER_BLOCK + page_count * self.page_size
        for commit in commits:
            for offset, _ in commit.frames:
                end = max(end, offset + self.journal.unit)
        unit = max(GRANULE, self.page_size)
        return F.HEADER_BLOCK + -(-(end - F.HEADER_BLOCK) // unit) * unit

    def _take_snapshot(self):
        """(Reader, holding the checkpoint lock shared) move to the last whole commit.

        ``freed`` becomes the offsets of the objects the commits moved past
        freed (they are all in the log: no checkpoint copies past a reader's
        snapshot, nor starts the log over).
        """
        try:
            root = self._read_main()
            pending = self._read_log()
            latest = pending[-1].txn if pending else self.main_txn
            if getattr(self, "mapping", None) is None or latest != self.txn:
                before = getattr(self, "txn", latest)
                self.freed = {offset for commit in pending if commit.txn > before for offset in commit.freed}
                try:
                    self._move_snapshot(root, pending)
                except BaseException:  # (cut short, the map is not all moved: the next refresh moves it)
                    self.txn = before
                    raise
        finally:
            if self.journal is not None:  # a reader reads the log only while taking a snapshot
                self.journal.close()
                self.journal = None

    def _move_snapshot(self, root, pending):
        self._adopt_state(root, pending)
        if getattr(self, "mapping", None) is None:
            self.mapping = MappedFile(self.io, True, F.HEADER_BLOCK, self.page_size)
        else:
            self.mapping.drop_private()
            self.mapping.extend()
        if self.mapping.size < F.HEADER_BLOCK + self.page_count * self.page_size:
            raise CorruptStorageError(f"{self.path!r}: the last commit has {self.page_count} pages but only "
                                      f"{self.mapping.size} bytes of the file could be mapped")
        self._apply_log(pending)
        if self._mark != self.txn:
            self.io.lock(F.LOCK_READERS + self.txn, False, wait=True)
            self.io.lock(_who_lock(self.txn), False, wait=True)
            if self._mark is not None:
                self.io.unlock(F.LOCK_READERS + self._mark)
                self.io.unlock(_who_lock(self._mark))
            self._mark = self.txn

    def check_files(self):
        """Verify the root records and the log against this open's state; return a summary.

        The main file must have its newest valid root record at the
        transaction this open believes it holds (``main_txn``); the log, when
        there is one, must be readable and its whole commits must continue
        the main file without a gap, name pages inside the file, and end at
        this open's transaction.  Raises CorruptStorageError naming the problem.
        """
        self._check_open()
        if self.readonly:  # read the main file and the log without a checkpoint in between
            self._lock_snapshot()
        try:
            return self._check_files()
        finally:
            if self.readonly:
                self.io.unlock(F.LOCK_CHECKPOINT)

    def _check_files(self):
        def fail(message):
            raise CorruptStorageError(f"{self._label}: {message}")

        head = self.io.pread(F.HEADER_BLOCK, 0)
        roots = [F.unpack_root(head[offset:offset + F.ROOT.size]) for offset in F.ROOT_OFFSETS]
        valid = [root for root in roots if root is not None]
        if not valid:
            fail("both root records are damaged")
        newest = max(root[0] for root in valid)
        # A reader's writer may have moved on; a writer's checkpoint may have written its root
        # record and been interrupted before it took note (the log still has those commits).
        if not self.readonly and not self.main_txn <= newest <= self.txn:
            fail(f"the main file's newest root record is transaction {newest}, but this open has "
                 f"{self.main_txn} in the main file and {self.txn} in all")
        main_txn = newest
        summary = {"transaction": self.txn, "main_transaction": self.main_txn,
                   "root_records_valid": len(valid), "log_commits": 0, "log_bytes": 0}
        if not self._use_journal:
            return summary
        self._log_at = F.unpack_log_at(head)
        journal = self._find_log(True)
        if journal is not None and not journal.valid:
            journal.close()
            journal = None
        if journal is None:
            if self.txn != main_txn and not self.readonly:
                fail(f"transaction {self.txn} is not in the main file and there is no log")
            return summary
        try:
            pending = [commit for commit in journal.commits if commit.txn > main_txn]
            if journal.valid and journal.base > main_txn:
                fail(f"the log starts after transaction {journal.base}, but the main file holds "
                     f"{main_txn}")
            last = pending[-1].txn if pending else main_txn
            if not self.readonly and last != self.txn:
                fail(f"the log ends at transaction {last}, but the last commit was {self.txn}")
            size = self.io.size()
            for commit in pending:
                if commit.page_count > (size - F.HEADER_BLOCK) // self.page_size:
                    fail(f"log transaction {commit.txn} has {commit.page_count} pages, more than the file")
                for offset, _ in commit.frames:
                    if offset < F.HEADER_BLOCK or offset + journal.unit > size:
                        fail(f"log transaction {commit.txn} writes at {offset:#x}, outside the file")
            summary["log_commits"] = len(pending)
            summary["log_bytes"] = journal.size()
        finally:
            journal.close()
        return summary

    def refresh(self):
        """(Read-only opens) Move to the last commit; return whether anything changed.

        Hold on to a snapshot only as long as needed: while a reader keeps an
        old one, checkpoints cannot copy newer commits into the main file and
        the log grows.
        """
        self._check_open()
        if self._at is not None:
            return False  # the state after a past transaction never changes
        if self.mode == "overlay":
            raise OverlayError(f"{self.path!r} is open as an overlay, which reads one snapshot of its base "
                               "for as long as it is open (its changes are made on top of that snapshot); "
                               "to see the base's later commits, open it again")
        if not self.readonly:
            return False
        before = self.txn
        self._lock_snapshot()
        try:
            self._take_snapshot()
        finally:
            self.io.unlock(F.LOCK_CHECKPOINT)
        return self.txn != before

    # -- state ---------------------------------------------------------------
    def _check_open(self):
        if self.closed:
            raise StorageClosedError(f"page file {self._label} is closed")

    @property
    def sync_failed(self):
        """Whether an fsync of the file or its log failed (then no more commits)."""
        return self.io.sync_failed or (self.journal is not None and self.journal.io.sync_failed) or (
            self._history is not None and self._history.sync_failed)

    def _check_writable(self):
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"{self.path!r} is open read-only")
        if self.sync_failed:
            raise SyncFailedError(f"{self.path!r}: an fsync failed earlier, so the system may have "
                                   "dropped written data; this open refuses to commit. Close it and "
                                   "open the file again: it reopens at its last durable commit")

    def _private_runs(self):
        """``(offset, length)``: runs of whole log units this process's map holds privately (changed or logged)."""
        unit = self.journal.unit if self.journal is not None else OS_PAGE
        last = self.mapping.size // unit * unit  # a unit must lie wholly inside the map
        for offset, length in self.mapping.dirty_ranges():
            start, end = offset // unit * unit, min(-(-(offset + length) // unit) * unit, last)
            if end > start:
                yield start, end - start, unit

    def _logged_image(self, entry):
        """The committed image of a logged page: its copy, else read back from the log."""
        return entry[1] if entry[1] is not None else self.journal.page_data(entry[0])

    def _changed_pages(self):
        """``(offset, image)`` of every log unit changed since the last commit (images are views of the map).

        Every logged page is still private, so each is compared with its
        committed image: a copy of the mapped bytes (at most 1 MiB at a time)
        and a ``memcmp`` per unit through ``startswith`` (comparing
        memoryviews goes byte by byte, 13 us a page).
        """
        logged, view, image_of = self._logged, self.mapping.view, self._logged_image
        for start, length, unit in self._private_runs():
            for at in range(start, start + length, _COMPARE_CHUNK):
                mapped = view(at, min(_COMPARE_CHUNK, start + length - at))
                copy = None
                for local in range(0, len(mapped), unit):
                    entry = logged.get(at + local)
                    if entry is not None:
                        if copy is None:
                            copy = mapped.tobytes()
                        if copy.startswith(image_of(entry), local):
                            continue  # committed, unchanged since
                    yield at + local, mapped[local:local + unit]

    def uncommitted(self):
        """The file offsets of the log units changed since the last commit, in order.

        >>> import os, tempfile
        >>> from permastruct.pages import PageFile
        >>> pf = PageFile(os.path.join(tempfile.mkdtemp(), "u.pf"), pageSize=256)
        >>> page = pf.allocate_page(); pf.flush(); pf.uncommitted()
        []
        >>> with page.pinned(): page.set_content(0, b"x")
        >>> pf.uncommitted()
        [4096]
        >>> pf.close()
        """
        self._check_open()
        if self.readonly:
            return []
        return [offset for offset, _ in self._changed_pages()]

    def commit(self, acknowledge=True, freed=(), meta=b"", durable=True):
        """Commit: log every changed page and the new root state.

        With ``sync`` the log is synced before this returns, so the commit
        survives a power loss; without, a crash keeps the file consistent but
        may lose the latest commits.  An exception from here (a failed write,
        an interrupt at any point) means the commit did not happen: on disk and
        in memory, everything is as before the call.

        ``acknowledge=False`` leaves the commit to be confirmed by the caller:
        until it sets ``_unacknowledged = None``, the next call of any
        operation (or :meth:`settle`) undoes it.  The storage layer uses that
        to make its own bookkeeping part of the commit.  ``freed``: the offsets
        of the objects the transaction freed, for readers (see ``_format``);
        ``meta``: the transaction's metadata (``_format.pack_txn_meta``), kept in
        its commit frame (an in-memory store or an overlay keeps none).
        ``durable=False``: this commit syncs nothing, as with ``sync=False`` (a
        power loss may take it back, whole); the next durable commit or
        checkpoint syncs it with its own.
        """
        self._check_writable()
        if self._undo_failed and not self.sync_failed:
            raise SyncFailedError(f"{self.path!r}: a commit that failed could not be taken out of the log "
                                  "(writing the log failed), so this open refuses to commit. Close it and "
                                  "open the file again: it reopens at a whole commit")
        self.settle()
        self._before_commit()
        if self.mode == "memory":
            return self._commit_in_memory(acknowledge, meta, freed)
        if self.mode == "overlay":
            return self._commit_overlay(acknowledge, meta, freed)
        root = (self.page_count, self.free_head, list(self.slots))
        end = F.HEADER_BLOCK + self.page_count * self.page_size
        pages, beyond = [], []
        for offset, image in self._changed_pages():
            (pages if offset < end else beyond).append((offset, image))
        if beyond:
            # Units wholly past the last page: the allocator dropped free pages at
            # the end after writing to them.  They hold nothing, and recovery
            # refuses a commit that writes past its pages: show their committed
            # images again instead of logging them.
            self._restore([(offset, len(image)) for offset, image in beyond])
        if not pages and root == self._committed and not freed:  # nothing changed: no transaction,
            if self.journal is not None and self.journal.size() > self.checkpoint_bytes:
                self._try_checkpoint()  # but a checkpoint a big commit left to do
            return
        self.slots[F.SLOT_TIME] = int(time.time() * 1e6)  # when: readers() tells a snapshot's age
        root = (self.page_count, self.free_head, list(self.slots))
        if self.page_count < self._committed[0]:
            self._shrink_at_close = True  # pages given back: the file may shrink at close
        sync = self.sync and durable
        if self.journal is None:
            path = self._own_log_path()
            self._lock_checkpoint()  # a reader takes the log's name and the log together
            try:
                self._record_log_path(path, sync)
                journal = Journal.create(path, OS_PAGE, self.main_txn, self._main_chain, self._identity())
            finally:
                self.io.unlock(F.LOCK_CHECKPOINT)
            self.journal = journal
            if sync:  # kept even if this fails: then sync_failed refuses further commits
                journal.make_durable()
        elif not self.journal.valid:  # a log whose header never made it, or a stale one: nothing counts
            self.journal.reset(self.main_txn, self._main_chain, truncate=True)
        journal = self.journal
        if sync:
            self._make_log_durable(journal, data=False)  # (what a commit without fsyncs left)
        if journal.size() > self.checkpoint_bytes:
            # Before this commit goes in (an exception here leaves it undone):
            # readers that refresh between commits have all seen the last one
            # now, so the log can start over.
            self._try_checkpoint(changing={offset for offset, _ in pages})
        history = self._before_state([offset for offset, _ in pages], journal.unit) if self.slots[
            F.SLOT_HISTORY] else None
        pages = self._write_fresh(pages, journal) if sync else pages
        keep = sum(len(image) for _, image in pages) <= self.checkpoint_bytes
        logged = self._logged
        undo = _Undo(self, journal, {offset: logged.get(offset) for offset, _ in pages})
        try:
            commit = journal.append(self.txn + 1, pages, root, sync, freed, meta, history)
            self._log_synced = sync
            for (offset, image), (_, position) in zip(pages, commit.frames):
                logged[offset] = [position, bytes(image) if keep else None]
            records = [] if commit.history is None else self._with_record(self._log_record(commit, journal))
            # Published in one step (no call in between, so no interrupt either).
            self.txn, self._committed, self._records, self._unacknowledged = (
                commit.txn, root, records, None if acknowledge else undo)
        except BaseException:
            self._undo(undo)
            raise

    #: A durable commit writes its fresh pages straight into the main file when they add up to this.
    fresh_bytes = 1 << 20

    def _write_fresh(self, pages, journal):
        """Write a large durable commit's *fresh* pages into the main file; return the others.

        A unit is fresh when it lies past every page that any state still
        readable holds: the main file's committed pages and those of every
        commit in the log (so no reader's snapshot, and no recovery, reads
        it).  Its bytes need no log frame: they go to the main file, are
        synced there before the log's commit frame names them, and the map
        drops its private copies (it shows the file again).  A crash before
        the commit frame leaves them past the committed end, unused.  A big
        load then writes its data once and syncs twice, instead of through
        the log and again at the checkpoint.  Only with ``sync``: without an
        fsync nothing orders these writes before the commit frame.
        """
        if not self.sync or sum(len(image) for _, image in pages) < self.fresh_bytes:
            return pages
        main = F.unpack_root(self.io.pread(F.ROOT.size, F.ROOT_OFFSETS[self._current_root]))
        counts = [commit.page_count for commit in journal.commits] + [self._committed[0]]
        if main is not None:
            counts.append(main[1])
        limit = F.HEADER_BLOCK + max(counts) * self.page_size
        fresh = [(offset, image) for offset, image in pages if offset >= limit]
        if sum(len(image) for _, image in fresh) < self.fresh_bytes:
            return pages
        try:
            self._write_pages(fresh, memoryview)
        except StorageFullError:  # (a file-size limit) the log may still take them: the usual way
            return pages
        self.io.fsync()  # before the commit frame that makes them part of the store
        runs = []
        for offset, image in fresh:
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1][1] += len(image)
            else:
                runs.append([offset, len(image)])
        self.mapping.discard_changes(runs)
        return [(offset, image) for offset, image in pages if offset < limit]

    def settle(self):
        """Undo a commit that was never acknowledged (see :meth:`commit`), or finish an undo
        that was itself interrupted; then there is none."""
        undo = self._undoing or self._unacknowledged
        if undo is not None:
            self._undo(undo)

    def _undo(self, undo):
        """Put the state before ``undo``'s commit back, in memory and on disk.

        Idempotent: ``_undoing`` is set first, so an undo cut short (an
        interrupt that was already on its way) is finished by the next call
        of :meth:`settle`; signals that arrive meanwhile are held back.  If the
        log cannot be written, the commit may still be on disk: this open then
        refuses further commits (the next open finds the log as it is).
        """
        self._undoing = undo
        held = _hold_interrupts()
        try:
            journal = undo.journal
            if journal is not None:
                del journal.commits[undo.commits:]
                journal.end, journal.chain = undo.end, undo.chain
            logged = self._logged
            for offset, entry in undo.logged.items():
                if entry is None:
                    logged.pop(offset, None)
                else:
                    logged[offset] = entry
            self.txn, self._committed, self._records = undo.txn, undo.committed, undo.records
            if undo.images is not None:  # (memory: the file itself holds the commits; a file store's
                self.main_txn, self._current_root = undo.main_txn, undo.current_root  # commit leaves these)
            try:
                if journal is not None:
                    journal.invalidate(undo.end, self.sync)
                if undo.images is not None:
                    self._undo_in_memory(undo)
            except OSError:
                self._undo_failed = True  # the caller's own exception says what went wrong first
            self._undoing = self._unacknowledged = None
        finally:
            _release_interrupts(held)

    def _undo_in_memory(self, undo):
        """(Memory) Put the file's old bytes back; if the map dropped its private copies, first
        copy the new bytes (all in the file by then) into the map again, as pending changes."""
        io, view = self.io, self.mapping.view
        if undo.dropping:
            for offset, length in undo.ranges:
                view(offset, length)[:] = io.pread(length, offset)
            undo.dropping = False  # (an undo cut short and run again must not copy the old bytes)
        for offset, old in undo.images:
            io.pwrite(old, offset)

    def _try_checkpoint(self, changing=()):
        try:
            self._checkpoint(changing=changing)
        except OSError:
            if self.sync_failed:
                raise
            # The commits are safe in the log; a later commit checkpoints again.

    def _commit_in_memory(self, acknowledge, meta=b"", freed=()):
        """(Memory) Commit by writing the changed pages into the in-memory file itself.

        The file holds the committed state; the map's private pages are the
        changes.  The file's old bytes of every changed range inside the
        committed pages are copied first (what lies past them holds nothing
        the committed state needs), so that an exception at any point, or an
        unacknowledged commit, is undone: the old bytes go back into the file
        and, if the map had already dropped its private copies, the new bytes
        into the map, so the changes are pending as before.  A commit costs a
        copy of the committed bytes it changes and a write of every changed
        page, in memory; there is no log and no sync.
        """
        mapping, io = self.mapping, self.io
        ranges = mapping.dirty_ranges()
        root = (self.page_count, self.free_head, list(self.slots))
        if not ranges and root == self._committed:
            return
        self.slots[F.SLOT_TIME] = int(time.time() * 1e6)
        root = (self.page_count, self.free_head, list(self.slots))
        slot = self._current_root ^ 1
        committed_end = F.HEADER_BLOCK + self._committed[0] * self.page_size
        records = self._memory_record(sorted({unit for offset, length in ranges for unit in range(
            offset // OS_PAGE * OS_PAGE, offset + length, OS_PAGE)}), root, meta, freed)
        undo = _Undo(self, None, {})
        undo.ranges = ranges
        undo.images = [(F.ROOT_OFFSETS[slot], io.pread(F.ROOT.size, F.ROOT_OFFSETS[slot]))] + [
            (offset, io.pread(min(length, committed_end - offset), offset))
            for offset, length in ranges if offset < committed_end]
        try:
            for offset, length in ranges:
                io.pwrite(mapping.view(offset, length), offset)
            io.pwrite(F.pack_root(self.txn + 1, *root), F.ROOT_OFFSETS[slot])
            # Published in one step (no call in between, so no interrupt either).
            self.txn, self.main_txn, self._current_root, self._committed, self._records, self._unacknowledged = (
                self.txn + 1, self.txn + 1, slot, root, records, None if acknowledge else undo)
            undo.dropping = True  # from here the map may show the file: the new bytes are all in it
            mapping.discard_changes(ranges)
        except BaseException:
            self._undo(undo)
            raise

    def _memory_record(self, changed, root, meta, freed):
        """(Memory, overlay) The retained records with the one of the commit being made (images in memory)."""
        history = self._before_state(changed, OS_PAGE)
        if history is None:
            return []
        before, size, images = history
        return self._with_record(Record(self.txn + 1, root[2][F.SLOT_TIME], size, meta, before, images, "memory",
                                        bytes, tuple(freed)))

    def _commit_overlay(self, acknowledge, meta=b"", freed=()):
        """(Overlay) Commit by keeping a copy of every changed page as its committed image.

        The base is never written: a committed page stays private in the map
        and its image in ``_logged`` (as a file store keeps a logged page until
        its checkpoint, which an overlay never does).  So changes cost their
        size twice in memory, and a commit compares every page changed so far
        with its image.
        """
        root = (self.page_count, self.free_head, list(self.slots))
        pages = list(self._changed_pages())
        if not pages and root == self._committed:
            return
        self.slots[F.SLOT_TIME] = int(time.time() * 1e6)
        root = (self.page_count, self.free_head, list(self.slots))
        logged = self._logged
        records = self._memory_record([offset for offset, _ in pages], root, meta, freed)
        undo = _Undo(self, None, {offset: logged.get(offset) for offset, _ in pages})
        try:
            for offset, image in pages:
                logged[offset] = [None, bytes(image)]
            self.txn, self._committed, self._records, self._unacknowledged = (
                self.txn + 1, root, records, None if acknowledge else undo)
        except BaseException:
            self._undo(undo)
            raise

    def _oldest_reader(self, upto):
        """The oldest transaction a reader holds (``upto`` when no reader holds an older one)."""
        oldest = upto
        while oldest > 0:
            found = self.io.first_conflict(F.LOCK_READERS, oldest)
            if found is None:
                break
            oldest = found - F.LOCK_READERS
        return oldest

    def readers(self):
        """The snapshots other read-only opens hold: a list of dicts, oldest first.

        Each has ``pid`` (the reader's process), ``transaction`` (its
        snapshot), ``behind`` (commits made since), ``since`` (when that commit
        was made, epoch seconds, or None if the file does not say) and
        ``log_bytes`` (log the snapshot keeps from being copied into the main
        file and reset: a reader that never refreshes makes the log grow).
        Readers of one process at one snapshot are one entry; this open's own
        snapshot is not listed.  Costs a few ``fcntl`` calls
        per reader and, in a reader, one read of the log.
        """
        self._check_open()
        found = []
        _find_locks(self.io, F.LOCK_WHO, F.LOCK_WHO + (1 << (22 + F.WHO_TXN_BITS)), found)
        mask = (1 << F.WHO_TXN_BITS) - 1
        held = []
        for start in found:
            pid, low = (start - F.LOCK_WHO) >> F.WHO_TXN_BITS, (start - F.LOCK_WHO) & mask
            held.append((pid, self.txn - ((self.txn - low) & mask)))  # the txn whose low bits these are
        if not held:
            return []
        if self.readonly:
            head = self.io.pread(F.HEADER_BLOCK, 0)
            self._log_at = F.unpack_log_at(head)
            journal = self._find_log(True)
        else:
            journal = self.journal
        try:
            commits = {commit.txn: commit for commit in journal.commits} if journal is not None else {}
            end = journal.size() if journal is not None else 0
            latest = max([self.txn] + list(commits))
            head = self.io.pread(F.HEADER_BLOCK, 0)  # the root records: the main file's last two commits
            stamps = {root[0]: root[3][F.SLOT_TIME] for root in (
                F.unpack_root(head[offset:offset + F.ROOT.size]) for offset in F.ROOT_OFFSETS) if root}
            result = []
            for pid, txn in sorted(held, key=lambda item: (item[1], item[0])):
                commit = commits.get(txn)
                if commit is not None:
                    stamp, log_bytes = commit.slots[F.SLOT_TIME], end - commit.end
                else:
                    stamp = stamps.get(txn, 0)
                    log_bytes = end - F.WAL_HEADER.size if journal is not None and txn < latest else 0
                result.append({"pid": pid, "transaction": txn, "behind": latest - txn,
                               "since": stamp / 1e6 if stamp else None, "log_bytes": max(0, log_bytes)})
            return result
        finally:
            if self.readonly and journal is not None:
                journal.close()

    def checkpoint(self, truncate=False):
        """Copy committed transactions from the log into the main file; reset the log when all are in.

        Only transactions that no reader still needs the old pages for are
        copied.  Returns the transaction the main file now holds.
        """
        self._check_writable()
        self.settle()
        return self._checkpoint(truncate)

    def _checkpoint(self, truncate=False, changing=()):
        """The checkpoint; ``changing``: offsets whose map bytes hold changes not yet committed.

        Every step leaves files that recovery reads right, and the in-memory
        state follows the disk only after the disk has changed: an exception
        anywhere leaves a checkpoint to do again (see the module's theory of
        operation).
        """
        journal = self.journal
        if journal is None or (self.main_txn >= self.txn and not (truncate and journal.io.size() > journal.size())):
            return self.main_txn
        self._unacknowledged = None  # a checkpointed commit cannot be undone: the caller has it
        self._lock_checkpoint()
        try:
            if self.main_txn >= self.txn:  # all in the main file: only shrink the log file
                self._archive_history(journal)
                journal.reset(self.main_txn, self._main_chain, truncate=True)
                return self.main_txn
            target = self._oldest_reader(self.txn)
            if target <= self.main_txn:
                return self.main_txn
            commit = next(commit for commit in journal.commits if commit.txn == target)
            everything = target == self.txn
            if everything:  # the newest image of every logged page (not the map: it may hold changes)
                sources, load = sorted(self._logged.items()), self._logged_image
            else:
                sources, load = sorted(journal.latest_frames(self.main_txn, target).items()), journal.page_data
            if not self.sync:  # the log must hold the commits before the main file changes
                journal.make_durable()
            else:
                self._make_log_durable(journal)
            needed = self._covering_size(commit.page_count, journal.commits)
            if self.io.size() < needed:
                self.io.fallocate(0, needed)
            self._write_pages(sources, load)
            self.io.fsync()  # the pages before the root record that names them
            # The record that does not hold main_txn: if this write is torn, the other one
            # (main_txn, whose commits are all still in the log) is the one recovery takes.
            slot = self._current_root ^ 1
            self.io.pwrite(F.pack_root(target, commit.page_count, commit.free_head, commit.slots, commit.chain),
                           F.ROOT_OFFSETS[slot])
            self.io.fsync()
            self._current_root, self.main_txn, self._main_chain = slot, target, commit.chain
            if everything:
                self._archive_history(journal)  # (fsynced) before the log that holds them starts over
                # The logged images are in the main file now; forget them before the
                # log starts over (its positions mean nothing afterwards).
                logged, self._logged = self._logged, {}
                journal.reset(target, commit.chain, truncate=truncate or journal.size() > 4 * self.checkpoint_bytes)
                self.mapping.discard_changes([(offset, journal.unit) for offset in logged
                                              if offset not in changing])
            self._give_back(commit.page_count)
        finally:
            self.io.unlock(F.LOCK_CHECKPOINT)
        return self.main_txn

    def _give_back(self, main_pages):
        """(Writer, in a checkpoint, holding the checkpoint lock) Give the file's free end back to the
        file system: the blocks past every page a snapshot can still reach.

        That end covers the main file's pages (``main_pages``), every commit
        still in the log (a reader's snapshot is the main file's or one of
        them: a reader on an old snapshot keeps its pages, and keeps this
        waiting until it refreshes or closes) and this writer's pages now.
        Readers touch only pages below their snapshot's page count, so no
        reader meets the cut (no SIGBUS).  The writer's own map must stay
        backed by the file (a touch past the end of a mapped file is a
        SIGBUS), so the file is cut there and then set back to the length
        the writer maps: a hole, whose blocks are free (``_hole``; the page
        layer calls :meth:`_reserve` before its page count grows into it);
        the close cuts it for good (:meth:`_shrink_file`).  A map whose
        changes are found by comparing its pages (no pagemap) gets no hole:
        only the bytes past the writer's map go.  Only when
        ``_shrink_at_close`` says a commit gave pages back.
        """
        if not self._shrink_at_close or not self._use_journal or self.mode != "file":
            return
        commits = self.journal.commits if self.journal is not None else ()
        pages = max([main_pages, self.page_count, self._committed[0]] + [commit.page_count for commit in commits])
        end = self._covering_size(pages, commits)
        size = self.io.size()
        keep = min(size, max(end, self.mapping.size))
        if self.mapping._pagemap is None:
            # Without the kernel's pagemap the map's changes are found by reading every page
            # of it, and a read of a hole's page on a full file system would be a SIGBUS: no
            # hole (only what lies past the map goes; the close cuts the rest).
            end = keep
        if size <= end:
            return
        if keep > end:
            hole = self._hole
            self._hole = (end, max(keep, hole[1]) if hole is not None else keep)
        try:
            self.io.truncate(end)
        finally:
            if keep > end:
                self.io.truncate(keep)

    def _reserve(self, pages):
        """(Writer, before its page count grows to ``pages``) Give the pages in a hole that
        :meth:`_give_back` made their blocks again, so that touching them on a full file
        system is a ``StorageFullError`` here and never a SIGBUS."""
        hole = self._hole
        if hole is None:
            return
        end = min(self._covering_size(pages, ()), hole[1])
        if end > hole[0]:
            self.io.fallocate(hole[0], end - hole[0])
            self._hole = None if end >= hole[1] else (end, hole[1])

    def _remove_log(self):
        """(Writer, closing) Delete the log when the main file holds every commit.

        The checkpoint lock is held exclusively, so no reader is reading the
        log: readers read it only while taking a snapshot, under that lock
        shared, and one that opens meanwhile waits and then finds no log
        (the main file alone is the latest commit).  When a reader's old
        snapshot kept the last checkpoint from copying everything, the log
        stays.  The directory is not synced: a log that comes back after a
        power loss holds only commits the main file has (it was reset after
        the checkpoint's fsyncs), and is skipped.
        """
        journal = self.journal
        if journal is None or self.main_txn != self.txn:
            return
        self._lock_checkpoint()
        try:
            self._archive_history(journal)
            self.journal = None
            journal.remove()
        finally:
            self.io.unlock(F.LOCK_CHECKPOINT)

    def _shrink_file(self):
        """(Writer, closing, its log removed) Give the file's unused end back to the file system.

        The allocator lowers the page count when free pages end the file
        (``Allocator.merge``, run by ``pack()``); the file keeps its size
        until here.  Only when ``_shrink_at_close`` says so (a commit of this
        open lowered the page count, or ``pack()`` ran: room a file was given
        up front and never used is kept otherwise), when the main file holds
        every commit and no reader
        is behind the last one (the log is gone: a checkpoint copied
        everything), so no snapshot has more pages than the last commit,
        and no page a reader reads is past the new end: readers touch only
        pages below their snapshot's page count, and a freed object's proxy
        dies at their refresh.  The file keeps whole map units (what an open
        maps).  A crash or power loss around it leaves the file longer,
        which is harmless.
        """
        if not self._shrink_at_close or self.journal is not None or self.main_txn != self.txn or not self._use_journal:
            return
        if self._oldest_reader(self.txn) < self.txn:
            return
        unit = max(GRANULE, self.page_size)
        end = F.HEADER_BLOCK + -(-(self.page_count * self.page_size) // unit) * unit
        if self.io.size() > end:
            self.io.truncate(end)

    def _write_pages(self, sources, load):
        """Write pages into the main file: ``sources`` are ``(offset, source)`` in offset order,
        ``load(source)`` the image; neighbours go out in one ``pwrite`` (up to 4 MiB each)."""
        run, run_at, run_end, run_bytes = [], 0, -1, 0
        for offset, source in sources:
            if offset != run_end or run_bytes >= 1 << 22:
                if run:
                    self.io.pwrite(b"".join(run), run_at)
                run, run_at, run_bytes = [], offset, 0
            image = load(source)
            run.append(image)
            run_bytes += len(image)
            run_end = offset + len(image)
        if run:
            self.io.pwrite(b"".join(run), run_at)

    def _restore(self, units):
        """Make the map show the committed image of these ``(offset, unit)`` again."""
        drop = []
        for page, unit in units:
            entry = self._logged.get(page)
            if entry is None:
                drop.append((page, unit))  # the file holds it
            else:
                self.mapping.view(page, unit)[:] = self._logged_image(entry)
        self.mapping.discard_changes(drop)

    def rollback(self):
        """Forget every change since the last commit (the map shows the committed pages again)."""
        self._check_writable()
        self.settle()
        self._forget_pages()
        self._restore([(page, unit) for start, length, unit in list(self._private_runs())
                       for page in range(start, start + length, unit)])
        self.page_count, self.free_head, slots = self._committed
        self.slots = list(slots)

    def savepoint(self):
        """The pending state now, for :meth:`rollback_to`: a copy of every log unit the transaction
        has changed so far, and the root state.  Costs a copy of what the transaction changed."""
        self._check_writable()
        self.settle()
        images = {offset: bytes(view) for offset, view in self._changed_pages()}
        return images, (self.page_count, self.free_head, list(self.slots)), self.txn

    def rollback_to(self, savepoint):
        """Return to a :meth:`savepoint` of the current transaction (the map shows its bytes again).

        Idempotent; a commit since the savepoint made it void: then this rolls the
        transaction back to that commit instead.
        """
        self._check_writable()
        self.settle()
        images, root, txn = savepoint
        if txn != self.txn:
            return self.rollback()
        self._forget_pages()
        changed = [offset for offset, _ in self._changed_pages()]
        unit = self.journal.unit if self.journal is not None else OS_PAGE
        self._restore([(offset, unit) for offset in changed if offset not in images])
        for offset, image in images.items():
            self.mapping.view(offset, len(image))[:] = image
        page_count, free_head, slots = root
        self.page_count, self.free_head, self.slots = page_count, free_head, list(slots)

    def abandon(self):
        """(Writer) Undo this open's creation of the store and close: a new file and its log are
        removed, an empty file is made empty again.  Still under the writer lock while it does."""
        if self.closed or not self.created or self.mode != "file":
            return self.close(flush=False)
        try:
            if self.journal is not None:
                journal, self.journal = self.journal, None
                journal.remove()
            if self.created == "new":
                FileIO.unlink(self.path)
            else:
                self.io.truncate(0)
        finally:
            self.close(flush=False)

    def close(self, flush=True):
        """Commit (when writable), checkpoint if no reader needs the log, and release the file.

        An in-memory store or an overlay is discarded instead: what it held is
        gone (the kernel frees its memory).  Calling it again does nothing.
        """
        if self.closed:
            return
        try:
            if flush and self.mode == "file" and not self.readonly and not self.sync_failed:
                self.commit()
                self.checkpoint(truncate=True)
                self._remove_log()
                self._shrink_file()
            elif not self.readonly:
                self.settle()  # a commit nobody acknowledged is not kept
        finally:
            self.closed = True
            self._forget_pages()
            self.mapping.close()
            if self._owner == os.getpid():
                # A map still referenced by a live view keeps mmap's duplicate of
                # the descriptor open, and with it the open file and its locks:
                # release them by hand.  A forked child shares the parent's open
                # file and must not release the parent's locks.
                self.io.unlock(F.LOCK_WRITER, 2)
                if self._mark is not None:
                    self.io.unlock(F.LOCK_READERS + self._mark)
                    self.io.unlock(_who_lock(self._mark))
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if self._history is not None:
                self._history.close()
                self._history = None
            self.io.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what the layer above adds ----------------------------------------------
    def _before_commit(self):
        """Called at the start of every commit (the page layer hands its dirty pages over)."""

    def _forget_pages(self):
        """Called when the pages seen so far may have changed (rollback, refresh, close)."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.path!r} at transaction {getattr(self, 'txn', '?')}>"


def _kept(found, last, limit):
    """The records of ``found`` (txn -> record) that history keeps: at most ``limit``, without a gap,
    ending at transaction ``last``; oldest first."""
    kept = []
    while last in found and len(kept) < limit:
        kept.append(found[last])
        last -= 1
    return kept[::-1]


def check_history(history):
    """Refuse a ``history`` that is not None or a number of transactions (0 and up)."""
    if history is None:
        return
    if not isinstance(history, int) or isinstance(history, bool):
        raise TypeError(f"history must be an int (how many transactions to keep undoable), not "
                        f"{type(history).__name__}")
    if not 0 <= history < 1 << 32:
        raise ValueError(f"history must be from 0 (none) to {(1 << 32) - 1} transactions, not {history}")


def _valid_page_size(size):
    return (isinstance(size, int) and F.MIN_PAGE_SIZE <= size <= F.MAX_PAGE_SIZE
            and size & (size - 1) == 0)


def _who_lock(txn):
    """The lock byte that says this process reads snapshot ``txn`` (see ``_format.LOCK_WHO``)."""
    return F.LOCK_WHO + (os.getpid() << F.WHO_TXN_BITS) + (txn & ((1 << F.WHO_TXN_BITS) - 1))


def _find_locks(io, low, high, found, depth=0):
    """Append to ``found`` the start of every lock other opens hold in ``[low, high)``."""
    if low >= high or depth > 64:
        return
    start = io.first_conflict(low, high - low)
    if start is None or not low <= start < high:
        return
    found.append(start)
    _find_locks(io, low, start, found, depth + 1)
    _find_locks(io, start + 1, high, found, depth + 1)


#: (device, inode) -> the Engine of this process that holds the file's writer lock.
_WRITERS = weakref.WeakValueDictionary()


def check_timeout(timeout):
    """Refuse a ``timeout`` that is not None or a non-negative number of seconds."""
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                or not timeout >= 0):  # refuses NaN too
        raise ValueError(f"timeout must be a non-negative number of seconds or None, not {timeout!r}")


def check_page_size(size):
    """Refuse a page size that is not a power of two in the range the format allows."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"pageSize must be an int, not {type(size).__name__}")
    if not _valid_page_size(size):
        raise ValueError(f"pageSize must be a power of two from {F.MIN_PAGE_SIZE} to "
                         f"{F.MAX_PAGE_SIZE}, not {size}")


class _Undo:
    """What :meth:`Engine._undo` needs to take one commit back: the state before it."""

    __slots__ = ("journal", "commits", "end", "chain", "logged", "txn", "committed", "main_txn",
                 "current_root", "images", "ranges", "dropping", "records")

    def __init__(self, engine, journal, logged):
        #: (File) the log and where it ended; None for the memory and overlay modes
        self.journal = journal
        if journal is not None:
            self.commits, self.end, self.chain = len(journal.commits), journal.end, journal.chain
        #: offset -> the ``_logged`` entry before the commit (None: there was none)
        self.logged = logged
        self.txn, self.committed = engine.txn, engine._committed
        self.main_txn, self.current_root = engine.main_txn, engine._current_root
        self.records = engine._records  #: the undo records before the commit
        #: (Memory) ``(offset, old bytes of the file)`` to write back; the changed ``ranges``;
        #: whether the map may have dropped its private copies of them (the file has the new bytes)
        self.images, self.ranges, self.dropping = None, (), False


#: Signals that arrive from outside (Ctrl-C, alarms, kill, a child's end), never from the
#: code itself: held back while an undo runs (blocking SIGSEGV and its kin is undefined).
_ASYNC_SIGNALS = frozenset(signal.valid_signals()) - {
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL",
                                       "SIGTRAP", "SIGSYS", "SIGABRT") if hasattr(signal, name)}


class _SignalSet(ctypes.Structure):
    """A ``sigset_t`` (1024 bits on Linux, larger than anywhere else)."""
    _fields_ = [("bits", ctypes.c_uint8 * 128)]


def _signal_mask_calls():
    """libc's ``pthread_sigmask`` and the set of _ASYNC_SIGNALS, or None where there is none.

    Not ``signal.pthread_sigmask``: it runs the Python handlers of signals already
    pending as it returns, so the KeyboardInterrupt would come from inside it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mask = libc.pthread_sigmask
    except (OSError, AttributeError):
        return None
    held = _SignalSet()
    libc.sigemptyset(ctypes.byref(held))
    for number in _ASYNC_SIGNALS:
        libc.sigaddset(ctypes.byref(held), int(number))
    return mask, held


_MASK = _signal_mask_calls()


def _hold_interrupts():
    """Block asynchronous signals in this thread (the main thread is the one whose Python handlers
    raise KeyboardInterrupt); returns what :func:`_release_interrupts` needs.  Never raises."""
    if _MASK is None or threading.current_thread() is not threading.main_thread():
        return None
    previous = _SignalSet()
    if _MASK[0](signal.SIG_BLOCK, ctypes.byref(_MASK[1]), ctypes.byref(previous)) != 0:
        return None
    return previous


def _release_interrupts(previous):
    """Restore the signal mask; held signals are delivered (their handlers run at Python's next check)."""
    if previous is not None:
        _MASK[0](signal.SIG_SETMASK, ctypes.byref(previous), None)
