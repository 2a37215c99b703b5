"""Crash-test kit for tests/test_crash.py: a seeded workload, its recorder, and the replay of crashes.

The job: find out what a store looks like after the process dies, or the power
fails, at any point of a random transactional workload, and whether that is
one of the states the workload committed (DESIGN.md 3.8, R1 and R2).

Three parts:

* **The workload** (:class:`Workload`): a :class:`CrashStorage` (a ``Root``
  with ints, a float, strings, a ``List`` of ints, a ``Dict`` of ``String`` keys
  to ``Item`` structures, a ``SortedDict``, a list of ``Item`` structures that
  shares some items with the dict, and a ``Buffer``) changed by seeded random
  operations in transactions: ``commit()``, ``rollback()``, ``with
  p.transaction()`` (some raising inside), close and reopen, ``pack()``, big buffers and
  bulk inserts so that the file grows, deletes and resets so that space is
  freed.  Every change is mirrored in a plain-Python model.  The model is the
  oracle: before a commit starts the workload logs ``("inflight", k, state)``,
  after it returns ``("returned", k, state)``, where ``state`` is canonical
  JSON of everything reachable from the root.  Commit 0 is the creation of the
  store (its state: a root of defaults).  After every returned commit the
  child also checks that the live store equals the model, so a model bug or a
  non-crash bug shows as such and not as a crash failure.

* **The child side** (``python tests/_crashkit.py MODE JSON``, with
  permastruct importable: :func:`child_env`): a
  ``FileIO.hook`` (:class:`Recorder`) appends every file operation, in order,
  to a log, interleaved with the markers.  ``record`` runs the workload once
  with the data of every write; ``killserver`` imports everything once, then
  for each kill point N read from stdin forks a process that runs the workload
  and kills itself (SIGKILL, or ``os._exit``) just before operation N;
  ``loop`` runs the workload without end until the test kills it from outside.

* **The parent side**: :func:`read_log` and :class:`Timeline` (which states are
  acceptable when the process dies before operation N), :class:`CrashFiles`
  (the files as a process crash before N leaves them: every earlier operation
  applied) and :class:`PowerLossFiles` (the files as a power loss leaves them:
  what was fsynced is on disk, each later write applied, dropped or torn per
  512-byte sector, each later allocate/truncate applied or dropped, a file
  whose directory was not fsynced after its creation possibly gone), and
  :class:`Verifier`, which writes such files to a scratch directory, opens them
  with ``CrashStorage(path)`` or the bare ``Storage(path)``, runs ``check()``,
  reads the state and :func:`judge`-s it.  A ``("mark", "failed", k)`` (a commit
  that raised, :meth:`Recorder.failed`) takes commit k out of what is
  acceptable: only the last returned commit is.  :class:`Report` collects a
  test's failures and fails it with the first case of each kind.

Also used by tests/test_diskfull.py (the workload on a full tmpfs) and
tests/_interruptkit.py (the schema, the model and the canonical state, for R7).
"""

import copy
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import sys
import time
import traceback
import zlib
from array import array

from permastruct import Dict, List, Set, SortedDict, Storage
from permastruct._commit import Engine
from permastruct._history import HistoryFiles
from permastruct._mapping import FileIO
from permastruct.errors import NotAStorageError, UndoError

KIT = os.path.abspath(__file__)
MAIN = "store.ps"  # the store's file name inside its directory
SECTOR = 512
VANISH = 0.25  # chance that a file whose name was never made durable is gone after a power loss


# == the schema ========================================================================
class CrashStorage(Storage):
    def populateSchema(self):
        s = self.schema

        class Item(s.Structure):
            name = s.String
            value = s.Int
            weight = s.Float
            note = s.ByteString

        Numbers = self.define(List("Numbers")[s.Int])
        ByName = self.define(Dict("ByName")[s.String, Item])
        Ranked = self.define(SortedDict("Ranked")[s.Int, s.ByteString])
        Items = self.define(List("Items")[Item])
        Tags = self.define(Set("Tags")[s.String])

        class Root(s.Structure):
            count = s.Int
            ratio = s.Float
            title = s.String
            tag = s.ByteString
            numbers = Numbers
            byname = ByName
            ranked = Ranked
            items = Items
            blob = s.Buffer
            tags = Tags  # (not used by Workload; the interrupt workload of _interruptkit uses it)


COLLECTIONS = ("numbers", "byname", "ranked", "items")


# == the model and the canonical state ==================================================
class ItemM:
    def __init__(self, name, value, weight, note):
        self.name, self.value, self.weight, self.note = name, value, weight, note


class BlobM:
    def __init__(self, data, format, shape):
        self.data, self.format, self.shape = bytearray(data), format, list(shape)


class Model:
    """What the store should hold: plain Python, shared items shared as objects."""

    def __init__(self):
        self.count = 0
        self.ratio = 0.0
        self.title = None
        self.tag = None
        self.numbers = None   # list of int
        self.byname = None    # dict str -> ItemM
        self.ranked = None    # dict int -> bytes
        self.items = None     # list of ItemM
        self.blob = None      # BlobM
        self.tags = None      # dict str -> None (an insertion-ordered set)


def _item_state(name, value, weight, note):
    return {"name": name, "value": value, "weight": weight, "note": None if note is None else note.hex()}


def _blob_state(data, format, shape):
    return {"len": len(data), "crc": zlib.crc32(data), "format": format, "shape": list(shape)}


def model_state(m):
    """The canonical state (plain dicts and lists) of a :class:`Model`."""
    def item(it):
        return _item_state(it.name, it.value, it.weight, it.note)
    return {
        "count": m.count, "ratio": m.ratio, "title": m.title,
        "tag": None if m.tag is None else m.tag.hex(),
        "numbers": None if m.numbers is None else list(m.numbers),
        "byname": None if m.byname is None else [[k, item(v)] for k, v in m.byname.items()],
        "ranked": None if m.ranked is None else [[k, v.hex()] for k, v in sorted(m.ranked.items())],
        "items": None if m.items is None else [item(it) for it in m.items],
        "blob": None if m.blob is None else _blob_state(bytes(m.blob.data), m.blob.format, m.blob.shape),
        "tags": None if m.tags is None else list(m.tags),
    }


def store_state(p):
    """The canonical state of everything reachable from ``p.root`` (also through a bare Storage)."""
    root = p.root

    def text(s):
        return None if s is None else str(s)

    def raw(s):
        return None if s is None else bytes(s).hex()

    def item(it):
        return _item_state(text(it.name), it.value, it.weight, None if it.note is None else bytes(it.note))

    numbers, byname, ranked, items, blob = root.numbers, root.byname, root.ranked, root.items, root.blob
    tags = root.tags
    state = {
        "count": root.count, "ratio": root.ratio, "title": text(root.title), "tag": raw(root.tag),
        "numbers": None if numbers is None else list(numbers),
        "byname": None if byname is None else [[str(k), item(v)] for k, v in byname.items()],
        "ranked": None if ranked is None else [[k, raw(v)] for k, v in ranked.items()],
        "items": None if items is None else [item(it) for it in items],
        "blob": None,
        "tags": None if tags is None else [str(t) for t in tags],
    }
    if blob is not None:
        with memoryview(blob) as view:
            state["blob"] = _blob_state(view.tobytes(), view.format, view.shape)
    return state


def dumps(state):
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


DEFAULT_STATE = dumps(model_state(Model()))


def model_from_store(p):
    """A :class:`Model` of what ``p`` holds, items shared where the store shares them."""
    m = Model()
    root = p.root
    m.count, m.ratio = root.count, root.ratio
    m.title = None if root.title is None else str(root.title)
    m.tag = None if root.tag is None else bytes(root.tag)
    seen = []  # (proxy, ItemM)

    def item(proxy):
        for other, model in seen:
            if other.isSameAs(proxy):
                return model
        model = ItemM(None if proxy.name is None else str(proxy.name), proxy.value, proxy.weight,
                      None if proxy.note is None else bytes(proxy.note))
        seen.append((proxy, model))
        return model
    if root.numbers is not None:
        m.numbers = list(root.numbers)
    if root.byname is not None:
        m.byname = {str(k): item(v) for k, v in root.byname.items()}
    if root.ranked is not None:
        m.ranked = {k: bytes(v) for k, v in root.ranked.items()}
    if root.items is not None:
        m.items = [item(v) for v in root.items]
    if root.blob is not None:
        with memoryview(root.blob) as view:
            m.blob = BlobM(view.tobytes(), view.format, view.shape)
    if root.tags is not None:
        m.tags = dict.fromkeys(str(t) for t in root.tags)
    return m


def describe_diff(actual, expected, limit=6):
    """The first few paths where two canonical states (JSON strings or objects) differ."""
    if isinstance(actual, str):
        actual = json.loads(actual)
    if isinstance(expected, str):
        expected = json.loads(expected)
    out = []

    def short(value):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    def walk(a, e, path):
        if len(out) >= limit or a == e:
            return
        if isinstance(a, dict) and isinstance(e, dict):
            for key in sorted(set(a) | set(e)):
                if key not in a or key not in e:
                    out.append(f"{path}.{key}: {'missing' if key not in a else short(a[key])} != "
                               f"{'missing' if key not in e else short(e[key])}")
                else:
                    walk(a[key], e[key], f"{path}.{key}")
        elif isinstance(a, list) and isinstance(e, list):
            if len(a) != len(e):
                out.append(f"{path}: length {len(a)} != {len(e)}")
            for index, (x, y) in enumerate(zip(a, e)):
                walk(x, y, f"{path}[{index}]")
        else:
            out.append(f"{path}: {short(a)} != {short(e)}")
    walk(actual, expected, "root")
    return "; ".join(out) if out else "(equal)"


# == the log: file operations and markers, one frame each ==============================
class Recorder:
    """The child's ``FileIO.hook``: log each operation (and the markers), die at operation ``kill_at``.

    Frames are written unbuffered (``os.write``), so the log is complete up to
    the moment the process dies.  ``with_data`` keeps the bytes of each write
    (for replay); without it only the length is kept.
    """

    def __init__(self, log_path, base, with_data=True, kill_at=None, kill_how="sigkill"):
        self.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.base = base
        self.with_data = with_data
        self.kill_at = kill_at
        self.kill_how = kill_how
        self.count = 0
        self._last_state = None

    def _write(self, event):
        frame = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        os.write(self.fd, struct.pack("<I", len(frame)) + frame)

    def hook(self, operation, path, *args):
        if self.count == self.kill_at:
            if self.kill_how == "exit":
                os._exit(86)
            os.kill(os.getpid(), signal.SIGKILL)
        self.count += 1
        key = os.path.relpath(path, self.base)
        if operation == "pwrite":
            data, offset = args
            args = (bytes(data) if self.with_data else len(data), offset)
        elif operation == "link":
            args = (os.path.relpath(args[0], self.base),)
        self._write(("op", operation, key) + tuple(args))

    def mark(self, what, k, state):
        """``what`` is "inflight" or "returned"; the state is logged only when it changed."""
        self._write(("mark", what, k, None if state == self._last_state else state))
        self._last_state = state

    def failed(self, k):
        """The commit in flight (number ``k``) raised: it did not return, so it must not be found."""
        self._write(("mark", "failed", k, None))

    def note(self, *event):
        self._write(event)

    def close(self):
        os.close(self.fd)


def read_log(path):
    """The events of a log; a frame cut short by the death of the writer is ignored."""
    with open(path, "rb") as f:
        raw = f.read()
    events, pos = [], 0
    while pos + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + length > len(raw):
            break
        events.append(pickle.loads(raw[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return events


# == the workload ======================================================================
class Boom(Exception):
    """Raised inside ``with p.transaction()`` to make it roll back."""


_TEXT = "abcdefghijklmnopqrstuvwxyz ABC0123456789_-äöüßéñ€→☃𝄞😀"


class Workload:
    """Seeded random transactions on a :class:`CrashStorage`, mirrored in a :class:`Model`.

    ``iterations`` is the number of random operations (a transaction does one to
    six of them); ``None`` runs until the process is killed.
    """

    OPS = (("scalar", 14), ("numbers", 14), ("byname", 16), ("ranked", 12), ("items", 12),
           ("blob", 8), ("grow", 5), ("reset", 4))

    def __init__(self, folder, seed, iterations, recorder, sync=True, page_size=4096, self_check=True, history=0):
        self.path = os.path.join(folder, MAIN)
        #: ``history=`` of the store (0: none); with history, ``undo()`` is one of the transactions
        self.history = history
        self.by_txn = {}  # transaction id -> the model of the store right after it (with history)
        self.rng = random.Random(seed)
        self.iterations = iterations
        self.rec = recorder
        self.sync = sync
        self.page_size = page_size
        self.self_check = self_check
        self.commits = 0
        self.names, self.weights = zip(*self.OPS)
        # Every other seed writes the fresh pages of any commit of 8 KiB or more straight into
        # the main file (Engine._write_fresh), so that the crashes hit that path too.
        Engine.fresh_bytes = 8192 if seed % 2 else 1 << 20
        # and every other seed of the history workloads starts its history files over often.
        HistoryFiles.slack = 0 if seed % 2 else 32

    # -- markers and the model check ------------------------------------------------
    def _inflight(self, m):
        self.rec.mark("inflight", self.commits + 1, dumps(model_state(m)))

    def _returned(self, p, m):
        self.commits += 1
        state = self.last_state = dumps(model_state(m))
        self.rec.mark("returned", self.commits, state)
        if self.history and p is not None:
            self.by_txn[p.last_transaction] = copy.deepcopy(m)
        if self.self_check and p is not None:
            actual = dumps(store_state(p))
            if actual != state:
                raise AssertionError(f"the live store differs from the model after commit {self.commits} "
                                     f"(a bug outside crash handling, or in the model): "
                                     f"{describe_diff(actual, state)}")

    # -- the run -------------------------------------------------------------------
    def open(self):
        return CrashStorage(self.path, sync=self.sync, **({"history": self.history} if self.history else {}))

    def run(self):
        """Run the workload.  The live storage, the model and the model of the last returned
        commit are kept in ``self.p``, ``self.m`` and ``self.committed`` (and that commit's
        canonical state in ``self.last_state``), so that a caller that catches an exception
        out of ``run()`` (test_diskfull: a full disk) knows where the workload stood."""
        rng = self.rng
        self.p = None
        if os.path.exists(self.path):  # loop mode: go on from what a killed run left
            self.p = self.open()
            self.m = model_from_store(self.p)
            self.last_state = dumps(model_state(self.m))
            self.rec.mark("returned", 0, self.last_state)
        else:
            self.m = Model()
            self.last_state = DEFAULT_STATE
            self.rec.mark("inflight", 0, DEFAULT_STATE)
            self.p = CrashStorage(self.path, fileSize=8192, stringRegistrySize=8, sync=self.sync,
                                  pageSize=self.page_size, **({"history": self.history} if self.history else {}))
            self.rec.mark("returned", 0, DEFAULT_STATE)
            if self.history:
                self.by_txn[self.p.last_transaction] = copy.deepcopy(self.m)
        self.committed = copy.deepcopy(self.m)
        done = 0
        while self.iterations is None or done < self.iterations:
            p, m = self.p, self.m
            if self.history:  # (without, the choices and so the seeds' runs are as they always were)
                style = rng.choices(("commit", "rollback", "with", "raise", "reopen", "empty", "pack", "undo"),
                                    (48, 12, 20, 10, 6, 4, 4, 10))[0]
            else:
                style = rng.choices(("commit", "rollback", "with", "raise", "reopen", "empty", "pack"),
                                    (48, 12, 20, 10, 6, 4, 4))[0]
            count = 0 if style in ("empty", "undo") else rng.randint(1, 6)
            done += max(count, 1)
            if style in ("with", "raise"):
                try:
                    with p.transaction():
                        for _ in range(count):
                            self.step(p, m)
                        if style == "raise":
                            raise Boom()
                        self._inflight(m)
                except Boom:
                    self.m = copy.deepcopy(self.committed)
                else:
                    self._returned(p, m)
                    self.committed = copy.deepcopy(m)
                continue
            for _ in range(count):
                self.step(p, m)
            if style == "rollback":
                p.rollback()
                self.m = copy.deepcopy(self.committed)
            elif style == "undo":  # back to the state before a transaction the history holds: one commit
                ids = [entry["id"] for entry in p.undo_log(0, self.history) if entry["id"] - 1 in self.by_txn]
                if ids:
                    target = rng.choice(ids)
                    self.m = m = copy.deepcopy(self.by_txn[target - 1])
                    self._inflight(m)
                    p.undo(target)
                    self._returned(p, m)
                    self.committed = copy.deepcopy(m)
            elif style == "pack":  # garbage collection from the root: one commit, the same state
                self._inflight(m)
                p.pack()
                self._returned(p, m)
                self.committed = copy.deepcopy(m)
            elif style == "reopen":
                self._inflight(m)
                p.close()
                self.p = p = self.open()
                self._returned(p, m)
                self.committed = copy.deepcopy(m)
            else:
                self._inflight(m)
                p.commit("crash kit", user="kit", extension={"steps": count})  # (metadata in the frame)
                self._returned(p, m)
                self.committed = copy.deepcopy(m)
        self._inflight(self.m)
        self.p.close()
        self._returned(None, self.m)

    def step(self, p, m):
        what = self.rng.choices(self.names, self.weights)[0]
        getattr(self, "op_" + what)(p, m)

    # -- random values ---------------------------------------------------------------
    def text(self, longest=24):
        rng = self.rng
        n = rng.randint(0, longest) if rng.random() < 0.95 else rng.randint(300, 3000)
        return "".join(rng.choice(_TEXT) for _ in range(n))

    def blob_bytes(self, n):
        return self.rng.randbytes(n)

    def new_row(self):
        """``(name, value, weight, note)`` of a new random item."""
        rng = self.rng
        name = self.text(12) if rng.random() < 0.9 else None
        value = rng.randint(-2**63, 2**63 - 1)
        weight = rng.uniform(-1e6, 1e6)
        note = self.blob_bytes(rng.randint(0, 40)) if rng.random() < 0.7 else None
        return name, value, weight, note

    def new_item(self, p):
        name, value, weight, note = self.new_row()
        return p.schema.Item(name=name, value=value, weight=weight, note=note), ItemM(name, value, weight, note)

    # -- operations ----------------------------------------------------------------
    def op_scalar(self, p, m):
        rng, root = self.rng, p.root
        which = rng.randrange(4)
        if which == 0:
            root.count = m.count = rng.randint(-2**63, 2**63 - 1)
        elif which == 1:
            root.ratio = m.ratio = rng.choice((rng.uniform(-1e9, 1e9), rng.random(), 0.0, -2.5e-300))
        elif which == 2:
            m.title = self.text() if rng.random() < 0.85 else None
            root.title = m.title
        else:
            m.tag = self.blob_bytes(rng.randint(0, 60)) if rng.random() < 0.85 else None
            root.tag = m.tag

    def _numbers(self, p, m):
        if m.numbers is None:
            p.root.numbers = []
            m.numbers = []
        return p.root.numbers

    def op_numbers(self, p, m):
        rng = self.rng
        numbers = self._numbers(p, m)
        n = len(m.numbers)
        which = rng.randrange(6)
        value = rng.randint(-2**63, 2**63 - 1)
        if which == 0 or n == 0:
            numbers.append(value)
            m.numbers.append(value)
        elif which == 1:
            values = [rng.randint(-1000, 1000) for _ in range(rng.randint(1, 40))]
            numbers.extend(values)
            m.numbers.extend(values)
        elif which == 2:
            index = rng.randrange(n)
            numbers[index] = m.numbers[index] = value
        elif which == 3:
            index = rng.randint(0, n)
            numbers.insert(index, value)
            m.numbers.insert(index, value)
        elif which == 4:
            numbers.pop()
            m.numbers.pop()
        else:
            a = rng.randint(0, n)
            b = rng.randint(a, min(n, a + 50))
            del numbers[a:b]
            del m.numbers[a:b]

    def _byname(self, p, m):
        if m.byname is None:
            p.root.byname = {}
            m.byname = {}
        return p.root.byname

    def op_byname(self, p, m):
        rng = self.rng
        byname = self._byname(p, m)
        which = rng.randrange(4)
        if which <= 1 or not m.byname:
            key = f"k{rng.randrange(60)}" if rng.random() < 0.8 else self.text(10)
            proxy, model = self.new_item(p)
            byname[key] = proxy
            m.byname[key] = model
        elif which == 2:
            key = rng.choice(list(m.byname))
            self._modify(byname[key], m.byname[key])
        else:
            key = rng.choice(list(m.byname))
            del byname[key]
            del m.byname[key]

    def _modify(self, proxy, model):
        rng = self.rng
        which = rng.randrange(4)
        if which == 0:
            proxy.value = model.value = rng.randint(-2**63, 2**63 - 1)
        elif which == 1:
            proxy.weight = model.weight = rng.uniform(-1e3, 1e3)
        elif which == 2:
            model.name = self.text(12) if rng.random() < 0.9 else None
            proxy.name = model.name
        else:
            model.note = self.blob_bytes(rng.randint(0, 40)) if rng.random() < 0.8 else None
            proxy.note = model.note

    def _ranked(self, p, m):
        if m.ranked is None:
            p.root.ranked = p.schema.Ranked()
            m.ranked = {}
        return p.root.ranked

    def op_ranked(self, p, m):
        rng = self.rng
        ranked = self._ranked(p, m)
        which = rng.randrange(4)
        if which <= 1 or not m.ranked:
            for _ in range(rng.randint(1, 12)):
                key, value = rng.randrange(-5000, 5000), self.blob_bytes(rng.randint(0, 24))
                ranked[key] = value
                m.ranked[key] = value
        elif which == 2:
            key = rng.choice(sorted(m.ranked))
            del ranked[key]
            del m.ranked[key]
        else:
            low = rng.randrange(-5000, 5000)
            for key in [k for k in sorted(m.ranked) if low <= k < low + rng.randint(10, 800)]:
                del ranked[key]
                del m.ranked[key]

    def _items(self, p, m):
        if m.items is None:
            p.root.items = []
            m.items = []
        return p.root.items

    def op_items(self, p, m):
        rng = self.rng
        items = self._items(p, m)
        which = rng.randrange(5)
        if which == 0 or not m.items:
            proxy, model = self.new_item(p)
            items.append(proxy)
            m.items.append(model)
        elif which == 1 and m.byname:  # share an item with the dict
            key = rng.choice(list(m.byname))
            items.append(p.root.byname[key])
            m.items.append(m.byname[key])
        elif which == 2:
            index = rng.randrange(len(m.items))
            self._modify(items[index], m.items[index])
        elif which == 3:
            index = rng.randrange(len(m.items))
            del items[index]
            del m.items[index]
        else:
            index = rng.randrange(len(m.items))
            items.insert(0, items[index])
            m.items.insert(0, m.items[index])

    def op_blob(self, p, m):
        rng = self.rng
        which = rng.randrange(4)
        if which == 0 or (which == 1 and m.blob is None):
            self._new_blob(p, m, rng.randint(0, 3000))
        elif which == 1 and len(m.blob.data):
            n = len(m.blob.data)
            a = rng.randrange(n)
            b = rng.randint(a, min(n, a + rng.choice((16, 600, 9000))))
            data = self.blob_bytes(b - a)
            with memoryview(p.root.blob) as view:
                with view.cast("B") as flat:
                    flat[a:b] = data
            m.blob.data[a:b] = data
        else:
            p.root.blob = m.blob = None

    def _new_blob(self, p, m, nbytes):
        rng = self.rng
        kind = rng.randrange(3)
        if kind == 0:
            source = self.blob_bytes(nbytes)
        elif kind == 1:
            source = array("d", (rng.uniform(-1, 1) for _ in range(nbytes // 8)))
        else:
            columns = rng.randint(1, 8)
            rows = max(1, nbytes // (4 * columns))
            source = memoryview(bytearray(self.blob_bytes(rows * columns * 4))).cast("B").cast("i", (rows, columns))
        view = memoryview(source)
        p.root.blob = source
        m.blob = BlobM(view.tobytes(), view.format, view.shape)

    def op_grow(self, p, m):
        """Something big, so that the file grows."""
        rng = self.rng
        which = rng.randrange(5)
        if which == 4:  # records made in bulk
            rows = [self.new_row() for _ in range(rng.randint(20, 400))]
            self._items(p, m).extend_records(rows)
            m.items.extend(ItemM(*row) for row in rows)
        elif which == 0:
            self._new_blob(p, m, rng.randint(20_000, 300_000))
        elif which == 1:
            numbers = self._numbers(p, m)
            values = [rng.randint(-2**63, 2**63 - 1) for _ in range(rng.randint(300, 3000))]
            numbers.extend(values)
            m.numbers.extend(values)
        elif which == 2:
            ranked = self._ranked(p, m)
            for _ in range(rng.randint(100, 600)):
                key, value = rng.randrange(-5000, 5000), self.blob_bytes(rng.randint(0, 24))
                ranked[key] = value
                m.ranked[key] = value
        else:
            items = self._items(p, m)
            for _ in range(rng.randint(20, 80)):
                proxy, model = self.new_item(p)
                items.append(proxy)
                m.items.append(model)

    def op_reset(self, p, m):
        """Drop or replace a whole collection (its space is freed at commit)."""
        rng = self.rng
        name = rng.choice(COLLECTIONS)
        setattr(p.root, name, None)
        setattr(m, name, None)
        if rng.random() < 0.5:
            getattr(self, "_" + name)(p, m)  # a new, empty one


# == the child side ======================================================================
def child_record(args):
    """Run the workload once, logging every operation with its data."""
    folder = args["dir"]
    rec = Recorder(args["log"], folder, with_data=True)
    FileIO.hook = rec.hook
    try:
        Workload(folder, args["seed"], args["iterations"], rec, sync=args["sync"],
                 page_size=args["page_size"], history=args.get("history", 0)).run()
        rec.note("end", rec.count)
    finally:
        FileIO.hook = None
        rec.close()


def child_loop(args):
    """Run the workload until killed (say "ready" on stdout first; the store is opened after)."""
    folder = args["dir"]
    rec = Recorder(args["log"], folder, with_data=False)
    FileIO.hook = rec.hook
    print("ready", flush=True)
    Workload(folder, args["seed"], None, rec, sync=args["sync"], page_size=args["page_size"],
             self_check=False).run()


def child_killserver(args):
    """Fork, per line ``{"n": N, "dir": ..., "log": ..., "how": ...}`` on stdin, a workload dying before operation N.

    Answers one JSON line per request: ``{"n": N, "status": ...}`` where status is
    "killed" (SIGKILL), "exited" (``os._exit``), "finished" (the workload ended
    before reaching N) or "error" (with the traceback in ``error``).
    """
    for line in sys.stdin:
        request = json.loads(line)
        folder = request["dir"]
        os.makedirs(folder, exist_ok=True)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                rec = Recorder(request["log"], folder, with_data=False,
                               kill_at=request["n"], kill_how=request["how"])
                FileIO.hook = rec.hook
                Workload(folder, args["seed"], args["iterations"], rec, sync=args["sync"],
                         page_size=args["page_size"], self_check=False, history=args.get("history", 0)).run()
            except BaseException:
                with open(request["log"] + ".error", "w") as f:
                    f.write(traceback.format_exc())
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {"n": request["n"]}
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            answer["status"] = "killed"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 86:
            answer["status"] = "exited"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            answer["status"] = "finished"
        else:
            answer["status"] = "error"
            try:
                with open(request["log"] + ".error") as f:
                    answer["error"] = f.read()
            except OSError:
                answer["error"] = f"wait status {status}"
        print(json.dumps(answer), flush=True)


def child_command(mode, **args):
    """The argv that runs this module in ``mode`` in a new Python process."""
    return [sys.executable, KIT, mode, json.dumps(args)]


def child_env():
    """The environment of a child: permastruct importable from where this process imports it."""
    import permastruct
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(permastruct.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# == the parent side: what is acceptable when ==========================================
class Expect:
    """What may be found after a crash just before some operation.

    ``returned``: (k, state id) of the last commit that returned, or None (none
    yet: the store may not exist).  ``inflight``: (k, state id) of the commit
    under way, or None.  ``history``: how many commits had returned.
    """

    __slots__ = ("returned", "inflight", "history")

    def __init__(self, returned, inflight, history):
        self.returned, self.inflight, self.history = returned, inflight, history


class Timeline:
    """The operations of a log, and for each crash point N (0..len(ops)) what is acceptable there.

    ``prior``, when given, is the state the store held before the logged run
    (a run that went on from a store left by a killed one).
    """

    def __init__(self, events, prior=None):
        self.ops = []
        self.states = []          # state id -> canonical JSON
        self._ids = {}
        self.returned_list = []   # (k, state id) in order
        self.failed_list = []     # (k, state id) of commits that raised, in order
        self.at = []              # N -> Expect
        self.ended = False
        returned = inflight = None
        last_state = None
        if prior is not None:
            returned = (0, self._id(prior))
            self.returned_list.append(returned)
        for event in events:
            if event[0] == "op":
                self.at.append(Expect(returned, inflight, len(self.returned_list)))
                self.ops.append(event[1:])
            elif event[0] == "mark" and event[1] == "failed":
                if inflight is not None:
                    self.failed_list.append(inflight)
                inflight = None  # a commit that raised is no commit: only the last returned one counts
            elif event[0] == "mark":
                _, what, k, state = event
                if state is None:
                    state = last_state
                last_state = state
                sid = self._id(state)
                if what == "inflight":
                    inflight = (k, sid)
                else:
                    returned, inflight = (k, sid), None
                    self.returned_list.append(returned)
            elif event[0] == "end":
                self.ended = True
        self.at.append(Expect(returned, inflight, len(self.returned_list)))

    def _id(self, state):
        sid = self._ids.get(state)
        if sid is None:
            sid = self._ids[state] = len(self.states)
            self.states.append(state)
        return sid

    def commits_with(self, state):
        """The numbers of the returned commits whose state is ``state``."""
        sid = self._ids.get(state)
        return [k for k, s in self.returned_list if s == sid]

    def describe_op(self, n, when="before"):
        """``before op N: pwrite store.ps @0x2000 +4096``."""
        if n >= len(self.ops) or n < 0:
            return "after the last operation" if n >= 0 else "before the first operation"
        kind, key, *args = self.ops[n]
        if kind == "pwrite":
            data, offset = args
            size = data if isinstance(data, int) else len(data)
            return f"{when} op {n}: pwrite {key} @{offset:#x} +{size}"
        return f"{when} op {n}: {kind} {key} {' '.join(map(str, args))}".rstrip()


class Outcome:
    """What opening a set of files gave: kind "missing", "notastore", "ok" (with state) or "error"."""

    __slots__ = ("kind", "state", "detail", "undone")

    def __init__(self, kind, state=None, detail="", undone=None):
        self.kind, self.state, self.detail = kind, state, detail
        #: (``undo=True``) ``(id, state)`` after ``undo(id)`` of the oldest transaction the history lists
        self.undone = undone


def judge(outcome, timeline, expect, lossy=False):
    """None if ``outcome`` is acceptable at a crash point with ``expect``, else the reason.

    Strict (a process crash, or power loss with ``sync=True``): the state of the
    last returned commit, or of the commit in flight; no store at all only
    before the first commit (the creation) returned.  ``lossy`` (power loss
    with ``sync=False``): any returned commit, the one in flight, or no store.
    """
    allowed = set()
    if expect.inflight is not None:
        allowed.add(expect.inflight[1])
    if lossy:
        allowed.update(sid for _, sid in timeline.returned_list[:expect.history])
    elif expect.returned is not None:
        allowed.add(expect.returned[1])
    may_be_missing = lossy or expect.returned is None
    if outcome.kind in ("missing", "notastore"):
        if may_be_missing:
            return None
        what = "the file is gone" if outcome.kind == "missing" else outcome.detail
        return f"commit {expect.returned[0]} had returned but {what}"
    if outcome.kind == "error":
        return outcome.detail
    sid = timeline._ids.get(outcome.state)
    if sid in allowed and outcome.undone is not None and outcome.undone[1] not in timeline._ids:
        return (f"undo({outcome.undone[0]}) of the recovered store found a state no commit had: "
                + describe_diff(outcome.undone[1], outcome.state))
    if sid in allowed:
        return None
    wanted = []
    if expect.returned is not None:
        wanted.append(f"commit {expect.returned[0]} (last returned)")
    if expect.inflight is not None:
        wanted.append(f"commit {expect.inflight[0]} (in flight)")
    equal = timeline.commits_with(outcome.state)
    raised = [k for k, s in timeline.failed_list if s == sid and k not in equal]
    found = (f"the state of commit(s) {equal}" if equal else
             f"the state of commit {raised[-1]}, whose commit() RAISED (it never returned)" if raised else
             "a state no commit had")
    closest = expect.returned or expect.inflight
    diff = describe_diff(outcome.state, timeline.states[closest[1]]) if closest else ""
    return (f"found {found}; wanted {' or '.join(wanted) or 'no store'}"
            + (f"; differences from commit {closest[0]}: {diff}" if diff else ""))


# == the parent side: the files after a crash =============================================
def _apply(files, op, fate=None):
    """Apply one operation to ``files`` (key -> bytearray); ``fate`` tears a pwrite per sector."""
    kind, key = op[0], op[1]
    if kind == "create":
        files.setdefault(key, bytearray())
        return
    if kind == "unlink":
        files.pop(key, None)
        return
    if kind == "link":  # a new file gets its name; its temporary name (if any) goes right after
        if key in files:
            files[op[2]] = files.pop(key)
        return
    data = files.get(key)
    if data is None:
        return  # the file vanished (power loss) and the operation went with it
    if kind == "pwrite":
        payload, offset = op[2], op[3]
        if fate is None:
            _write(data, offset, payload)
        else:
            for start, end in fate:
                _write(data, offset + start, payload[start:end])
    elif kind == "fallocate":
        end = op[2] + op[3]
        if end > len(data):
            data.extend(bytes(end - len(data)))
    elif kind == "truncate":
        length = op[2]
        if length < len(data):
            del data[length:]
        else:
            data.extend(bytes(length - len(data)))


def _write(data, offset, payload):
    if offset > len(data):
        data.extend(bytes(offset - len(data)))
    data[offset:offset + len(payload)] = payload


class CrashFiles:
    """The files after a process crash: every operation before the crash point applied."""

    def __init__(self):
        self.files = {}

    def apply(self, op):
        _apply(self.files, op)

    def image(self):
        return self.files


class PowerLossFiles:
    """The files after a power loss, from what was fsynced and what was merely written.

    Per file: ``durable`` holds its bytes at its last fsync; ``pending`` the
    operations after it.  A file's name is durable once its directory was
    fsynced after its creation.
    """

    def __init__(self):
        self.current = {}
        self.durable = {}
        self.pending = {}
        self.name_durable = {}
        self.unlinked = set()  # removed, but the removal's directory was not synced: it may come back

    def apply(self, op):
        kind, key = op[0], op[1]
        if kind == "create":
            self.durable[key] = bytearray()
            self.pending[key] = []
            self.name_durable[key] = False
            self.unlinked.discard(key)
        elif kind == "unlink":
            self.unlinked.add(key)
        elif kind == "link" and key in self.durable:
            # The name is new (durable after its directory's fsync); the bytes are the file's.
            target = op[2]
            self.durable[target] = self.durable.pop(key)
            self.pending[target] = self.pending.pop(key)
            self.name_durable.pop(key)
            self.name_durable[target] = False
            self.unlinked.discard(target)
        elif kind == "fsync":
            if key in self.current:
                self.durable[key] = bytearray(self.current[key])
                self.pending[key] = []
        elif kind == "fsync_dir":
            for name in self.name_durable:
                if os.path.dirname(name) == os.path.dirname(key):
                    self.name_durable[name] = True
            for name in list(self.unlinked):
                if os.path.dirname(name) == os.path.dirname(key):
                    self.unlinked.discard(name)
                    self.durable.pop(name, None)
                    self.pending.pop(name, None)
                    self.name_durable.pop(name, None)
        elif kind in ("pwrite", "fallocate", "truncate"):
            if key not in self.pending:  # a file that existed before the log began
                self.durable[key] = bytearray(self.current.get(key, b""))
                self.pending[key] = []
                self.name_durable[key] = True
            self.pending[key].append(op)
        _apply(self.current, op)

    def uncertain(self):
        """Whether a power loss now can leave anything but the synced state."""
        return any(self.pending.values()) or not all(self.name_durable.values()) or bool(self.unlinked)

    def image(self, rng, drop_all=False):
        """One possible state of the disk; ``drop_all``: nothing unsynced survives."""
        files = {}
        for key, durable in self.durable.items():
            if not self.name_durable[key] and (drop_all or rng.random() < VANISH):
                continue
            if key in self.unlinked and not drop_all and rng.random() < 0.5:
                continue  # the removal reached the disk
            files[key] = bytearray(durable)
            if drop_all:
                continue
            for op in self.pending[key]:
                choice = rng.random()
                if op[0] != "pwrite":
                    if choice < 0.5:
                        _apply(files, op)
                elif choice < 0.3:
                    _apply(files, op)
                elif choice < 0.6:
                    _apply(files, op, fate=_torn(rng, op[3], len(op[2])))
        return files


def _torn(rng, offset, length):
    """The (start, end) pieces of a write of ``length`` bytes at ``offset`` that reach the disk."""
    pieces = []
    start = 0
    while start < length:
        end = min(length, (offset + start) // SECTOR * SECTOR + SECTOR - offset)
        if rng.random() < 0.5:
            pieces.append((start, end))
        start = end
    return pieces


class Verifier:
    """Writes a set of files into a scratch directory and opens the store found there.

    Results are cached by the files' contents, so identical images (crash
    points that differ only by an fsync, say) are opened once.  ``opened``
    counts the images actually opened.
    """

    def __init__(self, scratch):
        self.scratch = scratch
        self.path = os.path.join(scratch, MAIN)
        self.cache = {}
        self.opened = 0

    def outcome(self, files, bare=False, reopen=False, undo=False):
        digest = hashlib.blake2b(digest_size=20)
        for key in sorted(files):
            digest.update(key.encode() + b"\0" + struct.pack("<Q", len(files[key])))
            digest.update(files[key])
        cache_key = (digest.digest(), bare, reopen, undo)
        cached = self.cache.get(cache_key)
        if cached is None:
            self._write(files)
            cached = self.cache[cache_key] = open_and_read(self.path, bare, reopen, undo)
            self.opened += 1
        return cached

    def _write(self, files):
        for name in os.listdir(self.scratch):
            target = os.path.join(self.scratch, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        for key, data in files.items():
            target = os.path.join(self.scratch, key)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)


def _error(where, exc, path):
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    message = str(exc).replace(os.path.dirname(path) + os.sep, "")
    return f"{where} raised {type(exc).__name__}: {message}{at}"


def open_and_read(path, bare=False, reopen=False, undo=False):
    """Open the store at ``path`` as a user would, ``check()`` it and read its state.

    ``reopen``: close it and do it all once more (what recovery wrote must be
    a store too, and the same state).  ``undo``: then open it again and undo
    the oldest transaction its history lists (the state found must be one
    the workload committed: the judge says so).
    """
    if not os.path.exists(path):
        return Outcome("missing")
    opener = Storage if bare else CrashStorage
    how = "Storage(path)" if bare else "CrashStorage(path)"
    states = []
    for _ in range(2 if reopen else 1):
        try:
            p = opener(path)
        except NotAStorageError as exc:
            if states:
                return Outcome("error", detail=_error(f"{how} after a successful open and close", exc, path))
            return Outcome("notastore", detail=_error(how, exc, path))
        except Exception as exc:
            return Outcome("error", detail=_error(how + (" (second open)" if states else ""), exc, path))
        try:
            try:
                p.check()
            except Exception as exc:
                return Outcome("error", detail=_error("check()", exc, path))
            try:
                states.append(dumps(store_state(p)))
            except Exception as exc:
                return Outcome("error", detail=_error("reading the state", exc, path))
        finally:
            try:
                p.close()
            except Exception as exc:
                return Outcome("error", detail=_error("close()", exc, path))
    if len(states) == 2 and states[0] != states[1]:
        return Outcome("error", detail="the second open found another state than the first: "
                                       + describe_diff(states[1], states[0]))
    undone = None
    if undo and not bare:
        try:
            with CrashStorage(path) as p:
                for entry in reversed(p.undo_log(0, 1 << 20)):  # the oldest first
                    try:
                        p.undo(entry["id"])
                    except UndoError:  # (the creation of the store: it changed the schema)
                        continue
                    p.check()
                    undone = (entry["id"], dumps(store_state(p)))
                    break
        except Exception as exc:
            return Outcome("error", detail=_error("undo of the recovered store", exc, path))
    return Outcome("ok", states[0], undone=undone)


# == the parent side: reporting ===========================================================
class Report:
    """The failures of one test; ``finish()`` prints the counts and fails with the first few cases.

    ``totals``, when given, is a ``{mode: Counter}`` that ``finish()`` adds its
    counts of cases and failures to.  At most ``shown`` kinds of failure are
    shown, each with its first case.
    """

    def __init__(self, mode, seed, rerun, totals=None, shown=8):
        self.mode, self.seed, self.rerun = mode, seed, rerun
        self.totals, self.shown = totals, shown
        self.cases = 0
        self.failures = []
        self.started = time.monotonic()

    def add(self, reason, n, where, variant=None, at=None):
        """Count a case; ``reason`` (None: it passed) is kept with where it happened
        (``at``, by default ``N=n``, and ``where``)."""
        self.cases += 1
        if reason is not None:
            if at is None:
                at = f"N={n}" + (f" variant={variant}" if variant is not None else "")
            self.failures.append((at, where, reason))

    def finish(self, counts):
        elapsed = time.monotonic() - self.started
        if self.totals is not None:
            self.totals[self.mode].update(cases=self.cases, failed=len(self.failures))
        print(f"\n[{self.mode}] seed={self.seed}: {counts}; {len(self.failures)} failed; {elapsed:.1f} s")
        if not self.failures:
            return
        import pytest
        kinds = {}
        for failure in self.failures:
            kinds.setdefault(failure_kind(failure[2]), []).append(failure)
        at, where, reason = self.failures[0]
        lines = [f"{self.mode}, seed {self.seed}: {len(self.failures)} of {self.cases} cases failed",
                 f"first: {at} ({where}): {reason}",
                 f"{len(kinds)} kinds of failure, by count, each with its first case:"]
        for kind, cases in sorted(kinds.items(), key=lambda item: -len(item[1]))[:self.shown]:
            at, where, reason = cases[0]
            lines.append(f"  {len(cases):5d} x  {at} ({where}): {reason}")
        if len(kinds) > self.shown:
            lines.append(f"  ... and {len(kinds) - self.shown} more kinds")
        lines.append(f"rerun: {self.rerun}")
        pytest.fail("\n".join(lines), pytrace=False)


def failure_kind(reason):
    """A failure reason without its numbers, paths and details: for counting kinds of failure."""
    reason = re.sub(r"'[^']*'", "'...'", reason.split("; differences")[0])
    reason = re.sub(r"0x[0-9a-f]+|-?\d+", "#", reason)
    return reason[:150]


if __name__ == "__main__":
    _mode, _args = sys.argv[1], json.loads(sys.argv[2])
    {"record": child_record, "loop": child_loop, "killserver": child_killserver}[_mode](_args)
