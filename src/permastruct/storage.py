"""The ``Storage`` class: the facade of one store - its file, schema, root, transactions and life.

``Storage`` opens the file (:mod:`permastruct._commit` through the page layer
:mod:`permastruct.pages`), builds the object heap (:mod:`permastruct._heap`)
and the schema (:mod:`permastruct._schema`), and offers what a program calls:
``root``, ``commit``/``rollback``/``transaction``, ``refresh``, ``readers``,
``check`` and ``close``.  The work is done in the layers below; this module
decides the order.  Subclass it and describe the schema in
``populateSchema``::

    class MyStorage(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                name = self.schema.String
                count = self.schema.Int

The seed's module name is kept: ``from permastruct.storage import Storage,
Structure, StructureMeta``.
"""

import contextlib
import os
import warnings
import weakref
from typing import Any, Callable, TypeVar

from . import _format as F
from . import _types as T
from ._alloc import Allocator
from ._commit import check_history, check_page_size, check_timeout
from ._heap import Heap
from ._history import bytes_before
from ._mapping import OS_PAGE
from ._schema import Schema
from .errors import (CorruptStorageError, ForkedProcessError, IncompleteChangeError, NotAStorageError,
                     PermastructError, ReadOnlyError, SchemaError, StorageClosedError, UndoError)
from .pages import PageFile
from .strings import StringRegistry, create_registry
from .structure import Structure, StructureMeta

__all__ = ["Storage", "Structure", "StructureMeta"]

DEFAULT_FILE_SIZE = 64 * 1024
_S = TypeVar("_S", bound="Storage")


DEFAULT_REGISTRY_SIZE = 64


class Storage:
    """A persistent object store in one memory-mapped file.

    ``Storage(fileName, fileSize=None, stringRegistrySize=None, *, readonly=False,
    sync=True, pageSize=4096, timeout=0, overlay=False, history=None, at=None)``.
    ``fileName=None`` makes an in-memory store that nothing outlives;
    ``overlay=True`` keeps the changes in memory on top of the file, which is
    never written; ``history=N`` keeps the last N transactions undoable
    (:meth:`undo`); ``readonly=True, at=id`` shows the state right after
    transaction ``id``.  See ``docs/tutorial.rst`` and ``docs/modes.rst``.
    """

    def __init__(self, fileName: "str | os.PathLike[str] | None", fileSize: "int | None" = None,
                 stringRegistrySize: "int | None" = None, *, readonly: bool = False, sync: bool = True,
                 pageSize: int = F.DEFAULT_PAGE_SIZE, timeout: "float | None" = 0, overlay: bool = False,
                 history: "int | None" = None, at: "int | None" = None) -> None:
        self._closed = True
        self._forked = False
        self._block = None  # the outermost with p.transaction() block open (see _Block)
        self._caches_txn = None  # (a reader) the transaction its caches were last put right for
        self.readonly = bool(readonly)
        for name, value in (("fileSize", fileSize), ("stringRegistrySize", stringRegistrySize)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, not {value}")
        check_page_size(pageSize)  # the same arguments are refused the same way on every open
        check_timeout(timeout)
        if not isinstance(overlay, bool):
            raise TypeError(f"overlay must be True or False, not {type(overlay).__name__}")
        check_history(history)
        if at is not None and (not readonly or overlay or fileName is None):
            raise ValueError("at=id opens the past state of a store file read-only: pass its path and "
                             "readonly=True (to return a writable store to a past state, use undo(id))")
        if history is not None and readonly:
            raise ValueError("history= is a setting of the store, which a read-only open cannot change: "
                             "open it writable to change it")
        if fileName is None:
            if overlay:
                raise ValueError("overlay=True needs the path of a base store (None makes an in-memory store)")
            if readonly:
                raise ValueError("an in-memory storage (fileName=None) cannot be read-only: it starts empty")
            self.fileName = None
            sync = False
        else:
            if overlay and readonly:
                raise ValueError("overlay=True and readonly=True together: an overlay is writable (its changes "
                                 "stay in memory and the file is never written); pass one of them")
            path = os.fspath(fileName)
            if not isinstance(path, str):
                raise TypeError(f"fileName must be a str or os.PathLike, not {type(fileName).__name__}")
            self.fileName = os.path.abspath(path)
        self.overlay = overlay
        self.sync = sync and not overlay  # (an overlay's commits stay in memory: nothing to sync)
        size = max(fileSize or DEFAULT_FILE_SIZE, F.HEADER_BLOCK + pageSize)
        self._page_file = PageFile(self.fileName, pageSize, readonly=self.readonly, sync=sync,
                                   initial_size=size, timeout=timeout, overlay=overlay, history=history, at=at)
        created = self._page_file.created
        if not created and self._page_file.txn == 1:
            # Created but never committed (a crash while creating it): nothing to lose.
            # A class with a schema creates it again; a reader or the bare Storage cannot.
            if self.readonly or type(self).populateSchema is Storage.populateSchema:
                self._page_file.close(flush=False)
                raise NotAStorageError(f"{self.fileName!r} is a store that was never committed "
                                       "(its creation did not finish); open it writable with its "
                                       "Storage subclass to create it again")
            created = True
        self._root = None
        self._heap = Heap(self, self._page_file, None)
        self._caches_txn = self._page_file.txn
        self._page_file._label = self._heap.name  # (an in-memory store: its class names it in messages)
        self.schema = Schema(self)
        try:
            self._closed = False
            if created:
                self._create(stringRegistrySize or DEFAULT_REGISTRY_SIZE)
            else:
                self._load()
                pf = self._page_file
                if not self.readonly and pf.slots[F.SLOT_HISTORY] != pf._committed[2][F.SLOT_HISTORY]:
                    self._commit()  # a new history= setting: kept in the file
        except BaseException:
            self._closed = True
            if self._page_file.created:
                self._page_file.abandon()  # a new file goes, an empty one is empty again
            else:
                self._page_file.close(flush=False)
            raise
        self.stringRegistry = StringRegistry(self._heap)
        _OPEN.add(self)
        # Dropped without close(): warn, and give back the file, its locks and its map (what
        # was not committed is lost, as after a crash).  Not at interpreter exit: the process's
        # end releases them anyway.
        self._finalizer = weakref.finalize(self, _collected, self._page_file, repr(self))
        self._finalizer.atexit = False

    @classmethod
    def memory(cls: "type[_S]", **kwargs: Any) -> "_S":
        """An in-memory store: the same as ``cls(None, **kwargs)`` (see ``docs/modes.rst``)."""
        return cls(None, **kwargs)

    # -- creation and loading ----------------------------------------------------
    def _create(self, registry_size):
        pf, heap = self._page_file, self._heap
        heap.allocator = Allocator(pf)
        pf.slots[F.SLOT_ALLOC] = heap.allocator.state_pid
        pf.slots[F.SLOT_REGISTRY] = create_registry(heap, registry_size)
        self.schema._bind_predefined()
        self.schema._run_populate()
        pf.slots[F.SLOT_SCHEMA] = self.schema._create()
        pf.flush()

    def _load(self):
        pf, heap = self._page_file, self._heap
        state = pf.slots[F.SLOT_ALLOC]
        if not 0 <= state < pf.page_count:
            raise CorruptStorageError(f"{heap.name}: the allocator page {state} does not exist")
        heap.allocator = Allocator(pf, state)
        self.schema._bind_predefined()
        stored = self.schema._read()
        grown = False
        if type(self).populateSchema is not Storage.populateSchema:
            self.schema._run_populate()
            grown = self.schema._bind(stored)
        else:
            self.schema._build(stored)
        if not self.readonly:  # what the last writer's program held has no holder now
            heap.unreferenced.update(heap.held_objects())
        if grown:  # new types or fields: the stored schema grows, in one commit made by the open
            self.schema._store()
            self._commit(durable=False)  # (idempotent: a power loss leaves the next open to do it)

    def populateSchema(self) -> None:
        """Describe the schema; override in a subclass (the base defines no types)."""

    def define(self, type_: Any) -> Any:
        """Define ``type_`` in the schema and return the type to use for fields.

        ``type_`` is a collection descriptor (``List('Agents')[Agent]``), which
        becomes a new type of the schema; a module-level structure class,
        whose class in this storage (a subclass of it) is made and returned;
        or a predefined type (``Buffer``, ``ByteString``, ``String``, value
        types), for which the storage's own version is returned.
        """
        return self.schema._define(type_)

    # -- explicit schema changes (docs/schema.rst) ---------------------------------------
    @staticmethod
    def rename_field(fileName: "str | os.PathLike[str]", type_name: str, old: str, new: str) -> None:
        """Rename field ``old`` of structure type ``type_name`` of the store in ``fileName`` to ``new``.

        One commit; no object is rewritten.  The store must not be open for
        writing elsewhere.  Then open it with classes that use the new name.
        """
        from ._schema import rename_field
        rename_field(_bare(fileName), type_name, old, new)

    @staticmethod
    def drop_field(fileName: "str | os.PathLike[str]", type_name: str, field: str) -> None:
        """Remove field ``field`` of structure type ``type_name`` of the store in ``fileName``.

        One commit; no object is rewritten (what the field referenced is
        released when each object is next written or freed).
        """
        from ._schema import drop_field
        drop_field(_bare(fileName), type_name, field)

    @staticmethod
    def change_field_type(fileName: "str | os.PathLike[str]", type_name: str, field: str,
                          new_type: Any) -> None:
        """Change number field ``field`` of ``type_name`` to number type ``new_type``, which must hold
        every value of the old one (``Int32`` to ``Int64``, ``Float32`` to ``Float``...).  One commit."""
        from ._schema import change_field_type
        change_field_type(_bare(fileName), type_name, field, new_type)

    # -- public API -----------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise StorageClosedError(f"{self!r} is closed")
        if self._forked:
            raise ForkedProcessError(f"{self!r} was opened before this process was forked: a forked child "
                                   "cannot use it (the parent owns its lock and its changes); open the "
                                   "file again in the child, after the parent has closed it")

    def _check_writable(self):
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"{self!r} is open read-only")

    @property
    def root(self) -> Any:
        """The instance of the schema's ``Root`` structure, created on first access."""
        self._check_open()
        if self._root is not None:
            return self._root
        offset = self._page_file.slots[F.SLOT_ROOT]
        if offset:
            root = self._heap.proxy(offset)
        else:
            cls = getattr(self.schema, "Root", None)
            if not isinstance(cls, StructureMeta):
                raise SchemaError(f"{self!r}: the schema has no Root structure; define "
                                  "'class Root(self.schema.Structure)' in populateSchema()")
            if self.readonly:
                raise ReadOnlyError(f"{self!r} is read-only and its root was never created")
            root = T.run_change(self._heap, self._make_root, cls)
        self._root = root
        return root

    def _make_root(self, cls):
        """Make the root object and record it: one change (cut short, the commit is refused)."""
        root = cls()
        self._heap.incref(root._ps_oid)
        self._page_file.slots[F.SLOT_ROOT] = root._ps_oid
        return root

    @property
    def closed(self) -> bool:
        return self._closed

    def commit(self, description: "str | None" = None, *, user: "str | None" = None,
               extension: "dict[str, Any] | None" = None) -> None:
        """Make every change since the last commit durable.

        Either it returns and the commit is made, or it raises (a full disk,
        an interrupt at any moment) and nothing of it is: the store is at its
        last commit, with the changes still pending (``rollback()``, or commit
        again; after an interrupt that cut short its freeing of unreferenced
        objects, the next commit refuses with ``IncompleteChangeError``: then
        ``rollback()``).  ``description``, ``user`` (strings) and ``extension`` (a dict
        of str to str, int, float or bool) are the transaction's metadata,
        kept in its commit frame in the log (an in-memory store or an overlay
        keeps none); a wrong type is a TypeError, a value that cannot be
        stored a ValueError, both before anything changes.  A commit with
        nothing to commit makes no transaction (``last_transaction`` stays).
        """
        meta = F.pack_txn_meta(description, user, extension)
        txn = self._page_file.txn
        try:
            return self._commit(meta)  # (made in the try: only the return itself is after it)
        except BaseException:
            if self._made_since(txn):
                return
            raise

    def _made_since(self, txn):
        """Whether a commit was made after the engine's transaction ``txn`` and acknowledged.

        An exception that reaches a commit's caller after that point (an
        interrupt arriving as the commit returns, at one of the last
        bytecodes of ``_commit()`` or of the call in ``commit()`` or a
        ``with`` block's exit) is dropped there: the commit was made, so the
        call returns.  Before it, the commit is taken back and the exception
        goes on (see :meth:`_commit`).  What follows is the outermost frame's
        ``RETURN_VALUE`` alone, where CPython delivers no signal (it checks for
        them at calls, function entries and backward jumps).
        """
        pf = self._page_file
        return pf.txn != txn and pf._unacknowledged is None and pf._undoing is None

    def _commit(self, meta=b"", durable=True):
        """:meth:`commit`; ``durable=False`` skips its fsyncs (the open's commit of a grown schema:
        lost to a power loss, it is made again by the next open; the next durable commit, or
        checkpoint, makes it durable with it)."""
        self._check_writable()
        self._check_whole()
        heap = self._heap
        if heap.poisoned:
            self._refuse_poisoned("commit")
        if heap.quarantine:
            heap.release_quarantine()  # (a place no view shows any more is freed by this commit)
        heap._changing = T._get_ident()  # a commit is one change: no other thread's meanwhile
        heap.collect_unreferenced()  # (cut short, this leaves _changing set: a rollback is due)
        heap.record_held()
        pf = self._page_file
        txn, pending = pf.txn, None
        try:
            pf.commit(acknowledge=False, freed=heap.freed, meta=meta, durable=durable)
            # The commit returns here: the heap's own bookkeeping and the engine's
            # confirmation in one step (no call in between, so no signal either).
            pending = heap.created, heap.created_many, heap.freed
            heap.created, heap.created_many, heap.freed, heap._changing, pf._unacknowledged = set(), [], [], 0, None
        except BaseException:
            if self._made_since(txn):  # confirmed (the last store above): made; the caller decides
                heap.created, heap.created_many, heap.freed, heap._changing = set(), [], [], 0
                raise
            if pending is not None:  # (an exception among the stores above: as before them)
                heap.created, heap.created_many, heap.freed = pending
            heap._changing = 0
            pf.settle()  # not confirmed: taken back; the changes are pending as before
            raise

    @property
    def last_transaction(self):
        """The id (an int) of the latest commit: of this storage's own, or (``readonly=True``) of the
        snapshot it reads.  Ids grow by one with every commit of the store.

        >>> p = Storage(None)
        >>> first = p.last_transaction
        >>> p.commit("nothing changed"); p.last_transaction == first
        True
        >>> p.close()
        """
        self._check_open()
        return self._page_file.txn

    # -- history (docs/modes.rst) --------------------------------------------------------
    def undo_log(self, first: int = 0, last: int = -20) -> "list[dict[str, Any]]":
        """The transactions that :meth:`undo` can take back, newest first, as ZODB's ``undoLog``.

        ``first`` is the index of the first one returned (0: the latest
        commit); ``last``, when not negative, the index past the last one,
        and when negative, minus the most to return (the default: 20).  Each
        is a dict with ``id``, ``time`` (epoch seconds), ``user_name``,
        ``description`` (strings, "" when not given), ``extension`` (a dict)
        and ``size`` (bytes the transaction changed, in whole pages).  Empty
        without ``history=``.  A read-only open lists those of its snapshot
        (read from the history files and the log), one opened with ``at=`` none.
        """
        self._check_open()
        for name, value in (("first", first), ("last", last)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if first < 0:
            raise ValueError(f"first must not be negative, not {first}")
        if last < 0:
            last = first - last
        records = self._page_file._history_log()[::-1]
        result = []
        for record in records[first:last]:
            description, user, extension = F.unpack_txn_meta(record.meta)
            result.append({"id": record.txn, "time": record.time / 1e6, "user_name": user or "",
                           "description": description or "", "extension": extension, "size": record.size})
        return result

    def _schema_before(self, chain):
        """The stored schema's bytes (its reference count left out) just before the first transaction
        of ``chain`` (undo records to the last commit; empty: the last commit); None if unreadable."""
        pf = self._page_file

        def current(offset, size):
            try:
                return bytes(pf.mapping.view(offset, size))
            except (IndexError, ValueError):
                return None
        offset = (chain[0].root if chain else pf._committed)[2][F.SLOT_SCHEMA]
        head = bytes_before(chain, offset, F.STRING.size, current, OS_PAGE)
        if head is None or F.STRING.unpack(head)[0] != F.T_SCHEMA:
            return None
        data = bytes_before(chain, offset + F.STRING.size, F.STRING.unpack(head)[3], current, OS_PAGE)
        return None if data is None else head[:4] + head[8:] + data

    def _forward_body(self, offset):
        return F.FORWARD.unpack_from(self._heap.mapping.view(offset, F.FORWARD.size))[2]

    def undo(self, id: int, description: "str | None" = None, *, user: "str | None" = None,
             extension: "dict[str, Any] | None" = None) -> "list[int]":
        """Return the store to its state just before transaction ``id``, as one new transaction.

        Transaction ``id`` and every later one are undone (pages are the unit
        of history: one transaction cannot be taken out alone); the undo is a
        commit of its own, kept in the history too, so it can be undone.
        Returns the ids undone, oldest first.  ``UndoError`` (nothing changed)
        when ``id`` is unknown or no longer kept, without ``history=``, while
        changes are pending, or when a transaction in between changed the
        stored schema (its bytes: a pack that only moved it does not count).  Proxies of objects that do not exist in the restored
        state die, as after a rollback (every proxy dies when the restored
        state is larger than what this open first mapped of the file and
        older than it: the file was cut at a close since, and is mapped anew;
        views of buffers taken before then no longer show the store).  They
        die before the undo's commit, so an interrupt cannot leave them alive
        after it; an undo that fails leaves them dead (using one raises).
        While a memoryview or a numpy array shows an object that the undo
        takes back (or a List array its List does not keep), ``UndoError``
        (nothing changed): release it first, as for ``bytearray``'s resize.
        ``description``, ``user`` and
        ``extension`` are the new transaction's metadata (the description
        defaults to ``"undo <id>"``).  Costs two walks over every object and
        a commit of every page that differs.
        """
        self._check_writable()
        meta = F.pack_txn_meta(f"undo {id}" if description is None else description, user, extension)
        self._check_whole()
        pf, heap = self._page_file, self._heap
        if heap.poisoned:
            self._refuse_poisoned(f"undo({id})")
        pf.settle()
        if heap.created or heap.created_many or heap.freed or pf.uncommitted() or (
                (pf.page_count, pf.free_head, pf.slots) != tuple(pf._committed)):
            raise UndoError(f"{self!r} has uncommitted changes: commit() or rollback() them before undo({id})")
        chain = pf._history_chain(id)
        roots = [record.root for record in chain] + [pf._committed]
        if any(before[2][F.SLOT_SCHEMA] != after[2][F.SLOT_SCHEMA] for before, after in zip(roots, roots[1:])):
            # (a pack moves the schema without changing it: only its bytes count)
            first = self._schema_before(chain)
            if first is None or first != self._schema_before([]):
                schemas = [self._schema_before(chain[index:]) for index in range(len(chain) + 1)]
                record = next((record for record, before, after in zip(chain, schemas, schemas[1:])
                               if before is None or before != after), chain[0])
                raise UndoError(f"{self!r}: transaction {record.txn} changed the stored schema (an open that "
                                f"added types or fields, or a schema change), so undo({id}) would leave the "
                                "classes out of step with the store; undo only later transactions")
        heap._changing = T._get_ident()
        try:
            live = {offset: type_id for offset, _, type_id in heap.walk()}
            # (the writer's proxy of a FORWARD may be laid over its body: it dies if the body moves)
            bodies = {offset: self._forward_body(offset) for offset in list(heap.proxies)
                      if live.get(offset) == F.T_FORWARD}
            undone = pf._restore_history(id)
            self.schema._schema_at = pf.slots[F.SLOT_SCHEMA]  # (the same schema, perhaps elsewhere)
            heap.allocator.release()
            heap.allocator = Allocator(pf, pf.slots[F.SLOT_ALLOC])
            kept = {offset: type_id for offset, _, type_id in heap.walk()}
            # Gone: what the restored state lacks, and what was made since where an undone
            # transaction freed an object (the restored state has that one there).
            reused = {offset for record in chain for offset in record.freed}
            freed = sorted(offset for offset, type_id in live.items() if kept.get(offset) != type_id or offset in reused)
            moved = [offset for offset, body in bodies.items()
                     if kept.get(offset) == F.T_FORWARD and self._forward_body(offset) != body]
            if pf._remapped:
                heap.forget_exports()  # (every view shows the old map: it reaches no store)
            elif heap.export_places:
                self._refuse_stale_views(id, freed)
            # The restored state is in the map: its proxies and caches are put right before the commit,
            # so that nothing can come between the commit and them (a commit that fails leaves these
            # proxies dead: their objects are back, but a dead proxy only ever raises).
            for offset in list(heap.proxies) if pf._remapped else freed + moved:
                heap.kill_proxy(offset, rolled_back=True)
            heap.forget_views()
            heap.unreferenced = set(heap.held_objects())
            self._root = None
            pf.commit(freed=freed, meta=meta)
        except BaseException:
            heap._changing = 0
            if pf._remapped:  # (every proxy points into the old map)
                for offset in list(heap.proxies):
                    heap.kill_proxy(offset, rolled_back=True)
            self.rollback()
            heap.allocator.release()
            heap.allocator = Allocator(pf, pf.slots[F.SLOT_ALLOC])
            self.schema._schema_at = pf.slots[F.SLOT_SCHEMA]
            raise
        heap._changing = 0
        return undone

    def _refuse_stale_views(self, id, gone):
        """(Undo, the restored state in the map) Refuse while a view of the buffer protocol shows an
        object the restored state does not have there: the view would write into free space or
        into another object."""
        stale = self._heap.stale_views(set(gone))
        if stale:
            raise UndoError(f"{self!r}: a memoryview (or an array made from one) still shows the object at "
                            f"{stale[0]:#x}, which undo({id}) takes back; release it (view.release(), or drop "
                            "the array, and the proxy it was made from: numpy.frombuffer keeps only that) "
                            "and undo again")

    def _refuse_poisoned(self, what):
        heap = self._heap
        raise IncompleteChangeError(
            f"{self!r}: {what} refused: a memoryview (or an array made from one) of an object a rollback "
            f"took back still points at {next(iter(heap.poisoned)):#x}, where the restored state has "
            "another object, so it may have written into it; release the view, then call rollback(): "
            "the store is at its last commit")

    def _quarantine(self, candidates, taken):
        """(The end of a rollback) Keep the places that views still show out of the allocator's reach
        (``Heap.quarantine_candidates``); what the restored state has there is moved away first
        (``_pack.evacuate``); only what cannot move poisons the store (no commits until a rollback
        after the views are gone)."""
        from ._pack import evacuate
        heap = self._heap
        lost = heap.quarantine_places(candidates, taken)
        if lost:
            try:
                moved = evacuate(self, [(offset, capacity) for offset, _, capacity, _, _ in lost])
            except Exception:  # (no room, say: poisoned, so nothing of this half move is ever committed)
                moved = False
            if moved:
                lost = heap.quarantine_places(lost, taken)  # (what was there has moved)
        if lost:
            heap.poison(lost)

    def _check_whole(self):
        """Refuse to commit while a change is running in another thread or was cut short here."""
        changing = self._heap._changing
        if changing:
            if changing != T._get_ident():
                T.begin_change(self._heap)  # raises ConcurrentUseError
            raise IncompleteChangeError(
                f"{self!r}: a change was interrupted before it finished (a KeyboardInterrupt or a "
                "MemoryError inside it), so this transaction holds half of it and cannot be committed; "
                "call rollback(): the store is at its last commit")

    def rollback(self) -> None:
        """Return to the last committed state; proxies of objects created since then die.

        It also ends every open ``with p.transaction()`` block: a block that
        is still open after an interrupt in its exit nests no later one.

        A memoryview (or numpy array) of an object it takes back keeps
        working on a *quarantined* place: claimed again as an object nothing
        references, so that no other object is put there; the first commit
        after the view (and the proxy it was made from) is gone frees it.
        When the restored state uses that place (the transaction had freed
        what was there and made the viewed object in its place), what is
        there is moved elsewhere first (a walk over every object); if it
        cannot move, commits are refused (``IncompleteChangeError``) until
        the view is gone and another rollback has put back what it wrote.
        It never refuses itself.  See
        docs/modes.rst, "Views of objects a rollback or an undo takes back".
        """
        self._check_writable()
        self._block = None
        heap = self._heap
        if heap._changing and heap._changing != T._get_ident():
            T.begin_change(heap)  # raises ConcurrentUseError
        created = heap.created_objects()
        heap.kill_created(created)  # first: a rollback cut short kills the rest on retry
        candidates = None
        if heap.export_places or heap.poisoned:  # (views of the buffer protocol: see Heap.quarantine;
            candidates = heap.quarantine_candidates(created)  # before ``created`` goes, for a retry)
        heap.created = set()
        # The views go before the pages go back, and again after: an interrupt just after the
        # discard must not leave a kept table view over a place the discard took back.
        heap.forget_views()
        self._page_file.discard()
        heap.forget_views()
        heap.freed = []
        heap.unreferenced = set(heap.held_objects())  # the committed state's: freed at the next commit
        self._root = None
        if candidates:
            heap._changing = T._get_ident()  # (one change: cut short, the next rollback does it again)
            self._quarantine(candidates, created)
        heap._changing = 0

    def refresh(self) -> bool:
        """(``readonly=True``) Move to the latest commit; return whether anything changed.

        Proxies stay usable; a proxy whose object the writer has since freed
        (its type in the file changed) dies like a closed one.  A writable
        storage always sees its own latest state: there this returns False.
        """
        self._check_open()
        # (also when nothing is new but the caches are not yet put right for the transaction the
        # map shows: a refresh cut short after the move would leave kept table views live over
        # the places of freed tables, and proxies of freed objects alive)
        pf = self._page_file
        if not pf.refresh() and (not self.readonly or pf.txn == self._caches_txn):
            return False
        heap = self._heap
        heap.forget_views()
        self._root = None
        self.schema._refresh()  # the types and versions the writer added
        freed = self._page_file.freed
        for offset, proxy in list(heap.proxies.items()):
            if offset in freed or not self.schema._still(proxy, heap.type_at(offset)):
                heap.kill_proxy(offset, rolled_back="freed")
        self._page_file.mapping.close_retired(heap.addresses_in_use())
        self._caches_txn = pf.txn
        return True

    def transaction(self, description: "str | None" = None, *, user: "str | None" = None,
                    extension: "dict[str, Any] | None" = None) -> "_Block":
        """``with p.transaction():`` commits on success and rolls back on an exception.

        Nested blocks are savepoints: a failing inner block undoes only what it
        did (and its objects' proxies die; views of them are quarantined as by
        :meth:`rollback`), a succeeding one keeps its changes
        for the outer block; only the outermost block commits.  Entering a
        nested block copies the pages the transaction has changed so far.
        ``description``, ``user`` and ``extension`` are the metadata of the
        commit (see :meth:`commit`), checked by the call; a nested block, which
        does not commit, refuses them when it is entered (ValueError).

        >>> import os, tempfile
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         class Root(self.schema.Structure):
        ...             a = self.schema.Int
        ...             b = self.schema.Int
        >>> p = S(os.path.join(tempfile.mkdtemp(), "t.ps"))
        >>> with p.transaction():
        ...     p.root.a = 1
        ...     try:
        ...         with p.transaction():
        ...             p.root.b = 2
        ...             raise ValueError("the inner block fails")
        ...     except ValueError:
        ...         pass
        >>> p.root.a, p.root.b
        (1, 0)
        >>> p.close()
        """
        F.pack_txn_meta(description, user, extension)  # refused here, before the block runs
        self._check_writable()
        return _Block(self, (description, user, extension))

    def _savepoint(self):
        """Everything :meth:`_rollback_to` needs to return to this moment of the transaction."""
        self._check_whole()
        heap = self._heap
        return (self._page_file.savepoint(), set(heap.created), list(heap.created_many), set(heap.unreferenced),
                list(heap.freed))

    def _rollback_to(self, point):
        """Return to a :meth:`_savepoint` (one change: cut short, a rollback is due)."""
        self._check_writable()
        heap = self._heap
        if heap._changing and heap._changing != T._get_ident():
            T.begin_change(heap)  # raises ConcurrentUseError
        engine_point, created, created_many, unreferenced, freed = point
        if engine_point[2] != self._page_file.txn:  # a commit() inside the block: the point is gone
            return self.rollback()
        heap._changing = T._get_ident()
        before = set(created)
        for offsets in created_many:
            before.update(offsets)
        taken = heap.created_objects() - before
        heap.kill_created(taken)  # objects made since die first (as in rollback)
        candidates = None
        if heap.export_places or heap.poisoned:  # (views of the buffer protocol: see Heap.quarantine;
            candidates = heap.quarantine_candidates(taken)  # before ``created`` goes, for a retry)
        heap.created = before
        self._page_file.rollback_to(engine_point)
        heap.forget_views()
        self._root = None
        heap.unreferenced, heap.freed = set(unreferenced), list(freed)
        if candidates:
            self._quarantine(candidates, taken)
        heap._changing = 0

    def close(self) -> None:
        """Commit what is pending and release the file; calling it again does nothing."""
        if self._closed:
            return
        heap = self._heap
        if heap._changing and heap._changing != T._get_ident():
            T.begin_change(heap)  # another thread is in the middle of a change: ConcurrentUseError
        incomplete = bool(heap._changing)
        poisoned = heap.poisoned_views() and not incomplete and not self.readonly
        incomplete = incomplete or poisoned
        heap.closing = True
        _OPEN.discard(self)
        self._finalizer.detach()
        try:
            if (self._page_file.mode == "file" and not self.readonly and not self._page_file.sync_failed
                    and not self._forked and not incomplete):  # (memory and overlays: discarded)
                heap._changing = T._get_ident()
                heap.collect_unreferenced(everything=True)
                heap.record_held()  # (now nothing)
                self._page_file.commit(freed=heap.freed)
                heap.freed = []
                self._page_file.close()  # checkpoints, removes the log if it can
                heap._changing = 0
        finally:
            self._closed = heap.closed = True
            heap.writable = False
            self._root = None
            heap.forget_views()
            message = f"{self!r} is closed: its objects can no longer be used"
            for cls in list(heap.classes.values()):  # no proxy can touch the memory from now on
                T.refuse_all(cls, StorageClosedError, message)
            for offset in list(heap.proxies):
                heap.kill_proxy(offset)
            for view in list(heap.exports.values()):
                with contextlib.suppress(BufferError, ValueError):
                    view.release()
            if heap.allocator is not None:
                heap.allocator.release()
            self._page_file.close(flush=False)  # (after an exception: what was not committed is not)
        if poisoned:
            raise IncompleteChangeError(
                f"{self!r} was closed without committing: a memoryview of an object a rollback took back "
                "pointed into another object, which it may have changed; the store is at its last commit")
        if incomplete:
            raise IncompleteChangeError(
                f"{self!r} was closed without committing: a change had been interrupted before it "
                "finished (a KeyboardInterrupt or a MemoryError inside it); the store is at its last commit")

    def __enter__(self: "_S") -> "_S":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not self._closed and not self.readonly:
            with contextlib.suppress(PermastructError, OSError):
                self.rollback()
        self.close()

    def __repr__(self):
        if self.fileName is None:
            return f"<{type(self).__name__} (memory)>"
        if self.overlay:
            return f"<{type(self).__name__} {self.fileName!r} (overlay)>"
        return f"<{type(self).__name__} {self.fileName!r}>"

    def check(self, progress: "Callable[[int, int, str], object] | None" = None) -> "dict[str, Any]":
        """Verify the whole file; raise CorruptStorageError naming the first problem, or return a summary.

        ``progress``, if given, is called as ``progress(done, total, what)``
        as the check advances, first over the pages (``what == "pages"``),
        then over the objects (``"objects"``); each phase ends with
        ``done == total``.  The root records and the log are checked last.
        """
        self._check_open()
        from ._check import check_storage
        summary = check_storage(self, progress)
        summary.update(self._page_file.check_files())
        summary["history"] = len(self._page_file._history_log())  # (transactions undo() can reach)
        return summary

    def objects(self, cls=None):
        """Proxies of every live object whose type is ``cls`` or a subclass of it (all when None),
        in file order.

        One walk of every page finds them (``Heap.walk``); objects made or
        freed while iterating are not seen.  Unlinked cycles count as live
        until :meth:`pack` frees them.  See ``docs/maintenance.rst``.
        """
        self._check_open()
        from ._pack import objects
        return objects(self, cls)

    def pack(self, progress=None):
        """Free every object the root cannot reach, cycles included, in one commit; return counts.

        Marks from the root, the schema, the string registry and every object
        a live proxy holds, frees the rest, merges the free lists, moves the
        live objects at the end of the file down (not those a live proxy
        holds) and commits (what was pending is committed with it); then a
        checkpoint gives the file's free end back.  Returns a dict with
        ``objects_freed``, ``bytes_freed``, ``pages_released``, ``pages`` and ``objects_moved``.
        Reads every page and follows every reference: it costs about what
        :meth:`check` costs, and it first verifies the objects as :meth:`check`
        does: on a damaged store, ``CorruptStorageError`` and nothing changed.
        See ``docs/maintenance.rst``.
        """
        self._check_writable()
        from ._pack import pack
        return pack(self, progress)

    def backup(self, path, *, compact=False):
        """Copy the last commit (a reader: its snapshot) to the new file ``path``; return a summary.

        Nothing is locked: the writer and other readers go on meanwhile.  The
        copy is written under a temporary name, fsynced, linked at ``path``
        and the folder fsynced; it opens as an ordinary store with no log and
        its own store id.  An existing ``path``: ``FileExistsError``; the
        store or its log as ``path``: ``ValueError``; a full disk:
        ``StorageFullError`` and no file left.  Returns a dict with ``path``,
        ``transaction``, ``pages`` and ``bytes``.  Cost: a read and a write of
        every page.  ``compact=True`` copies only what the root reaches, into
        consecutive pages (every offset renumbered): about the size of the
        live data, at the cost of a full copy first and of memory for every
        object's JSON form.  See ``docs/maintenance.rst``.
        """
        self._check_open()
        from ._backup import backup, compact_copy
        return compact_copy(self, path) if compact else backup(self, path)

    def readers(self) -> "list[dict[str, Any]]":
        """The snapshots that read-only opens (in any process) hold, oldest first.

        A list of dicts with ``pid``, ``transaction``, ``behind`` (commits made
        since), ``since`` (when that snapshot's commit was made, in epoch
        seconds) and ``log_bytes`` (what the snapshot keeps in the log: the
        writer never waits for a reader, but cannot copy commits newer than
        the oldest snapshot into the main file, so a reader that never calls
        ``refresh()`` makes the log grow).  Readers of one process at one
        snapshot are one entry; this storage's own snapshot is not listed.

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "r.ps")
        >>> w = Storage(path); w.commit()
        >>> w.readers()
        []
        >>> r = Storage(path, readonly=True)
        >>> [(reader["pid"] == os.getpid(), reader["behind"]) for reader in w.readers()]
        [(True, 0)]
        >>> r.close(); w.close()
        """
        self._check_open()
        return self._page_file.readers()

    @property
    def fileSize(self) -> int:
        """The size of the file in bytes."""
        self._check_open()
        return self._page_file.io.size()


_OPEN = weakref.WeakSet()  # the open storages of this process


def _bare(fileName):
    """The store in ``fileName`` opened writable with the bare Storage (an explicit schema change);
    a missing or empty file is not made a store."""
    path = os.fspath(fileName)
    if not os.path.isfile(path) or not os.path.getsize(path):
        raise NotAStorageError(f"{os.path.abspath(path)!r} is not a store (missing or empty)")
    return Storage(path)


class _Block:
    """One ``with p.transaction():`` block (see :meth:`Storage.transaction`).

    The outermost open block commits or rolls back at its exit; a block
    entered while another is open is a savepoint.  ``open`` goes False first
    thing at the exit, so an interrupt there at worst leaves a block that
    looks open until the next ``rollback()`` (which the interrupted exit
    calls for, and which ends every block); a nested block rolls back to its
    point only while its outer block is still the open one.
    """

    __slots__ = ("storage", "meta", "outer", "point", "open")

    def __init__(self, storage, meta):
        self.storage, self.meta, self.outer, self.point, self.open = storage, meta, None, None, False

    def __enter__(self):
        storage = self.storage
        outer = storage._block
        if outer is not None and outer.open:
            if self.meta != (None, None, None):
                raise ValueError("a nested p.transaction() block does not commit (the outermost one does): "
                                 "give the description, user and extension to the outermost block")
            self.outer, self.point = outer, storage._savepoint()
        else:
            storage._block = self
        self.open = True
        return storage

    def __exit__(self, kind, value, traceback):
        self.open = False
        storage = self.storage
        if self.outer is None:
            if kind is None:
                description, user, extension = self.meta
                txn = storage._page_file.txn
                try:  # (the commit and the False returned made in the try: only the return is after it)
                    return bool(storage.commit(description, user=user, extension=extension))
                except BaseException:
                    if storage._made_since(txn):
                        return False
                    raise
            else:
                storage.rollback()
        elif kind is not None and storage._block is self.outer and self.outer.open:
            storage._rollback_to(self.point)
        return False


def _collected(page_file, name):
    """The finalizer of a storage that was dropped without ``close()``."""
    if page_file.closed:
        return
    warnings.warn(f"unclosed storage {name}: it was garbage-collected without close(); what it had "
                  "not committed is lost", ResourceWarning, stacklevel=2)
    with contextlib.suppress(Exception):
        page_file.close(flush=False)


def _after_fork_in_child():
    """Every storage open in the parent refuses to be used in the child, and so do its proxies."""
    for storage in list(_OPEN):
        storage._forked = True
        storage._heap.writable = False
        storage._finalizer.detach()  # the parent owns the file, its locks and its log
        message = (f"{storage!r} was opened before this process was forked: a forked child cannot use "
                   "it or its objects (the parent owns its locks and its changes); open the file again "
                   "in the child, after the parent has closed it")
        for cls in list(storage._heap.classes.values()):
            T.refuse_all(cls, ForkedProcessError, message)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
