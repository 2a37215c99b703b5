"""Dump and load: a store as a readable tree, as portable JSON, and a new store rebuilt from that JSON.

Layer 11 of the architecture (``docs/architecture.rst``), beside ``_check``
and ``_pack``: it reads objects through their proxies and makes them through
the schema, as a program would.  ``python -m permastruct dump`` and ``load``
call it; the JSON form is documented in ``docs/maintenance.rst``.

The JSON form (``FORMAT`` version 1) is one object::

    {"format": "permastruct-json", "version": 1,
     "schema": [type, ...],      # the defined types, in the order they were defined
     "root": 1,                  # the id of the root object (or null: none yet)
     "interned": [id, ...],      # the strings of the string registry
     "objects": [object, ...]}   # every object reachable from the root, and the interned strings

A type is ``{"name": N, "kind": "structure", "base": B, "fields": [[name,
type], ...]}`` (its own fields; ``B`` is ``"Structure"`` or a structure
defined before) or ``{"name": N, "kind": "list" | "dict" | "set" |
"sorteddict", "params": [type, ...]}``; a type is named by its name
(``"Int"``, ``"Float32"``, ``"String"``, ``"Agent"``).  An object is ``{"id":
n, "type": N, ...}`` with, by kind: ``"fields": {name: value}`` (a
structure), ``"text"`` (a String), ``"base64"`` (a ByteString; a Buffer also
has ``"format"``, ``"itemsize"`` and ``"shape"``), ``"items": [value, ...]``
(a List or Set) or ``"items": [[key, value], ...]`` (a Dict or SortedDict).
A value is a JSON number or boolean, ``"NaN"``, ``"Infinity"`` or
``"-Infinity"`` for those floats, ``null`` for None, or ``{"ref": n}``: the
object with id ``n``, so shared objects and cycles appear once (a string key
that a Dict or Set holds inline, with no object of its own, is written as a
string object of its own for each place it is a key).  Ids are given
in the order a breadth-first walk from the root meets the objects (then the
interned strings nothing else reaches, by contents), so the dump of a store
rebuilt by :func:`load_json` is the same text as the dump it came from.
"""

import base64
import collections
import contextlib
import ctypes
import json
import keyword
import math
import os

from . import _format as F
from . import _types as T
from . import collections as C
from ._mapping import sync_folder
from ._schema import type_label
from .errors import LoadError, PermastructError, SchemaError

__all__ = ["dump_text", "dump_json", "load_json", "FORMAT"]

FORMAT = "permastruct-json"
VERSION = 1
_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_VALUE_NAMES = ("Int", "Float", "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32",
                "UInt64", "Float32", "Float64")
_PREDEFINED = _VALUE_NAMES + ("ByteString", "String", "Buffer")


# -- the readable tree ----------------------------------------------------------------------
def dump_text(storage, out=print, depth=None, items=None):
    """Print the tree of objects reachable from the root of ``storage``, one line each.

    Each object is shown once; a later reference to it is ``-> @0x...`` (so
    shared objects and cycles end).  Strings and numbers are shown as
    values.  ``depth``: levels below the root to show (None: all);
    ``items``: elements shown per collection (None: all).  No recursion: a
    chain of any length is shown.
    """
    root = storage.root if storage._page_file.slots[F.SLOT_ROOT] else None
    if root is None:
        out("(no root object yet)")
        return
    seen = set()
    if depth == 0:
        out(_head(root, seen) + " ...")
        return
    out(_head(root, seen))
    stack = [(_children(root, items), 1)]
    while stack:
        children, level = stack[-1]
        entry = next(children, None)
        if entry is None:
            stack.pop()
            continue
        label, value = entry
        indent = "  " * level
        if not isinstance(value, T.Persistent) or type(value)._ps_kind == "string":
            out(f"{indent}{label}: {_scalar(value)}")
        elif value._ps_oid in seen:
            out(f"{indent}{label}: -> @{value._ps_oid:#x}")
        else:
            line = _head(value, seen)
            if depth is not None and level >= depth and _has_children(value):
                out(f"{indent}{label}: {line} ...")
            else:
                out(f"{indent}{label}: {line}")
                stack.append((_children(value, items), level + 1))


def _head(proxy, seen):
    seen.add(proxy._ps_oid)
    cls = type(proxy)
    kind = cls._ps_kind
    if kind in C.KINDS:
        return f"{cls.__name__}[{len(proxy)}] @{proxy._ps_oid:#x}"
    if kind == "buffer":
        return (f"{cls.__name__} @{proxy._ps_oid:#x}: format {proxy.format!r}, shape {proxy.shape}, "
                f"{proxy.nbytes} bytes")
    return f"{cls.__name__} @{proxy._ps_oid:#x}"


def _has_children(proxy):
    kind = type(proxy)._ps_kind
    return kind == "structure" or (kind in C.KINDS and len(proxy) > 0)


def _children(proxy, limit):
    """``(label, value)`` of what ``proxy`` holds: its fields, or its first ``limit`` elements."""
    cls = type(proxy)
    kind = cls._ps_kind
    if kind == "structure":
        for name in cls._ps_field_types:
            yield name, getattr(proxy, name)
        return
    if kind not in C.KINDS:
        return
    total = len(proxy)
    if kind in ("dict", "sorteddict"):
        source = ((f"[{_scalar(key) if not isinstance(key, T.Persistent) or type(key)._ps_kind == 'string' else key}]",
                   value) for key, value in proxy.items())
    elif kind == "set":
        source = (("-", element) for element in proxy)
    else:
        source = ((f"[{index}]", element) for index, element in enumerate(proxy))
    for index, entry in enumerate(source):
        if limit is not None and index >= limit:
            yield "...", _More(total - limit)
            return
        yield entry


class _More:
    def __init__(self, count):
        self.count = count

    def __repr__(self):
        return f"({self.count} more)"


def _scalar(value, longest=60):
    if isinstance(value, T.Persistent):  # a string
        text, longer = value._ps_prefix(longest)
        return repr(text) + ("..." if longer else "")
    return repr(value)


# -- JSON -----------------------------------------------------------------------------------
def dump_json(storage):
    """The portable JSON form of ``storage`` (see the module documentation), as a Python dict."""
    schema, root, entries, interned = _json_parts(storage)
    objects = list(entries)
    return {"format": FORMAT, "version": VERSION, "schema": schema, "root": root, "interned": interned,
            "objects": objects}


def _json_parts(storage):
    """``(schema, root id, entries, interned ids)`` of the JSON form: ``entries`` yields the object
    entries one at a time, in id order (only the ids met so far are held); the list of interned
    ids is filled in when it is exhausted."""
    heap = storage._heap
    classes = sorted((cls for type_id, cls in heap.classes.items() if type_id >= F.FIRST_USER_TYPE),
                     key=lambda cls: cls._ps_type_id)
    schema = []
    for cls in classes:
        if cls._ps_kind == "structure":
            base = cls.__bases__[0]
            schema.append({"name": cls.__name__, "kind": "structure",
                           "base": base.__name__ if base._ps_type_id >= F.FIRST_USER_TYPE else "Structure",
                           "fields": [[name, type_label(ftype)] for name, ftype in cls._ps_own_fields]})
        else:
            schema.append({"name": cls.__name__, "kind": cls._ps_kind,
                           "params": [type_label(t) for t in cls._ps_params]})
    ids = {}
    queue = collections.deque()

    def ref(value):
        if value is None:
            return None
        if isinstance(value, (str, bytes)):  # a Dict or Set key kept inline: dumped as a string of its own
            number = ids[("inline key", len(ids))] = len(ids) + 1
            queue.append((number, value))
            return {"ref": number}
        if not isinstance(value, T.Persistent):
            return _value(value)
        number = ids.get(value._ps_oid)
        if number is None:
            number = ids[value._ps_oid] = len(ids) + 1
            queue.append(value)
        return {"ref": number}

    root = storage.root if storage._page_file.slots[F.SLOT_ROOT] else None
    root_id = ref(root)
    interned_ids = []

    def entries():
        yield from _drain(queue, ref)
        interned = sorted(_interned(storage), key=lambda s: (type(s)._ps_type_id, bytes(s)))
        for string in interned:
            interned_ids.append(ref(string)["ref"])
            yield from _drain(queue, ref)
        interned_ids.sort()
    return schema, None if root_id is None else root_id["ref"], entries(), interned_ids


def _interned(storage):
    heap = storage._heap
    registry = storage._page_file.slots[F.SLOT_REGISTRY]
    capacity = F.REGISTRY.unpack_from(heap.mapping.view(registry, F.REGISTRY.size))[3]
    heap.check_offset(registry, F.REGISTRY.size + 8 * capacity)
    return [heap.proxy(offset) for offset in heap.mapping.view(registry + F.REGISTRY.size, 8 * capacity).cast("Q")
            if offset]


def _drain(queue, ref):
    while queue:
        proxy = queue.popleft()
        yield _inline_key(*proxy) if type(proxy) is tuple else _object(proxy, ref)


def _inline_key(number, value):
    """The string object entry of a Dict or Set key that the table holds inline (no object of its own)."""
    if isinstance(value, str):
        return {"id": number, "type": "String", "text": value}
    return {"id": number, "type": "ByteString", "base64": base64.b64encode(value).decode("ascii")}


def _value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _object(proxy, ref):
    cls = type(proxy)
    kind = cls._ps_kind
    entry = {"id": ref(proxy)["ref"], "type": cls.__name__}
    if kind == "structure":
        entry["fields"] = {name: ref(getattr(proxy, name)) for name in cls._ps_field_types}
    elif kind == "string":
        if cls._ps_type_id == F.T_STRING:
            entry["text"] = proxy.contents
        else:
            entry["base64"] = base64.b64encode(bytes(proxy)).decode("ascii")
    elif kind == "buffer":
        entry.update(format=proxy.format, itemsize=proxy.itemsize, shape=list(proxy.shape),
                     base64=base64.b64encode(bytes(proxy)).decode("ascii"))
    elif kind in ("dict", "sorteddict"):
        entry["items"] = [[ref(key), ref(value)] for key, value in proxy.items()]
    elif kind in ("list", "set"):
        entry["items"] = [ref(element) for element in proxy]
    else:
        raise LoadError(f"cannot dump object {proxy._ps_oid:#x} of type {cls.__name__} (kind {kind})")
    return entry


def write_json(storage, stream):
    """Write the JSON form of ``storage`` (or of a document :func:`dump_json` returned) to the text
    ``stream``: strict JSON, one schema type and one object a line (so a dump diffs well).  A store
    is written as it is walked: only the ids met so far are held, not the document."""
    if isinstance(storage, dict):  # (written as given: its own format and version)
        document = storage
        head = document["format"], document["version"]
        schema, root, entries, interned = (document["schema"], document["root"], document["objects"],
                                           document["interned"])
    else:
        head = FORMAT, VERSION
        schema, root, entries, interned = _json_parts(storage)
    encode = json.JSONEncoder(allow_nan=False, ensure_ascii=True).encode
    stream.write("{" + ", ".join(f"{encode(key)}: {encode(value)}"
                                 for key, value in zip(("format", "version", "root"), head + (root,))))
    for key, items in (("schema", schema), ("objects", entries)):
        stream.write(f",\n {encode(key)}: [")
        separator = "\n  "
        for entry in items:
            stream.write(separator + encode(entry))
            separator = ",\n  "
        stream.write("\n ]")
    stream.write(f",\n {encode('interned')}: {encode(interned)}}}\n")


# -- load -------------------------------------------------------------------------------------
def load_json(document, path, *, pageSize=F.DEFAULT_PAGE_SIZE):
    """Build a new store at ``path`` from ``document`` (the dict :func:`dump_json` returns).

    Refuses an existing ``path`` (``FileExistsError``).  The store is built
    under a temporary name beside ``path`` and renamed into place when it is
    committed and closed, so a failure (a ``LoadError`` naming what in the
    document is wrong, a full disk) leaves nothing at ``path`` and no
    temporary file.  Returns the number of objects made.
    """
    from .storage import Storage  # (same layer: the facade makes the store)
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise FileExistsError(f"{path!r} exists: load makes a new store only")
    plan = _Plan.__new__(_Plan)
    plan.where = "the document"
    with _as_load_error(plan):
        plan.__init__(document)
    folder = os.path.dirname(path)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.load-{os.getpid()}")
    store = None
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)

        class Loaded(Storage):
            def populateSchema(self):
                plan.define(self)

        with _as_load_error(plan):
            store = Loaded(temporary, pageSize=pageSize)
            made = plan.build(store)
        store.commit()
        store._page_file._shrink_at_close = True  # the file ends at its last page (no growth room)
        store.close()
        store = None
        if os.path.lexists(path):
            raise FileExistsError(f"{path!r} appeared while the store was being loaded")
        os.rename(temporary, path)
        sync_folder(folder)
        return made
    except BaseException:
        if store is not None:
            with contextlib.suppress(Exception):
                store.rollback()
            with contextlib.suppress(Exception):
                store.close()
        for leftover in (temporary, temporary + F.WAL_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise


@contextlib.contextmanager
def _as_load_error(plan):
    """What a value of the wrong kind raises while a document is read or built, as a LoadError
    that names the part of the document (``plan.where``)."""
    try:
        yield
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError, RecursionError) as exc:
        if isinstance(exc, PermastructError) and not isinstance(exc, (LoadError, SchemaError)):
            raise
        if isinstance(exc, LoadError):
            raise
        raise LoadError(f"{plan.where}: {type(exc).__name__}: {exc}") from None


class _Plan:
    """A JSON document checked piece by piece, then turned into a schema and objects."""

    def __init__(self, document):
        self.where = "the document"
        if not isinstance(document, dict):
            self.fail(f"is a {type(document).__name__}, not a JSON object")
        if document.get("format") != FORMAT:
            self.fail(f"has format {document.get('format')!r}, not {FORMAT!r}: not a permastruct dump")
        if document.get("version") != VERSION:
            self.fail(f"has version {document.get('version')!r}; this permastruct reads version {VERSION}")
        self.schema = self.list_of(document, "schema")
        self.objects = self.list_of(document, "objects")
        self.interned = self.list_of(document, "interned")
        self.root = document.get("root")
        self.types = {}  # name -> schema entry
        for index, entry in enumerate(self.schema):
            self.where = f"schema[{index}]"
            self.check_type(entry)
        self.by_id = {}
        for index, entry in enumerate(self.objects):
            self.where = f"objects[{index}]"
            if not isinstance(entry, dict):
                self.fail("is not a JSON object")
            number = entry.get("id")
            if type(number) is not int or number in self.by_id:
                self.fail(f"has id {number!r}: an id is an int used once")
            name = entry.get("type")
            if not isinstance(name, str) or name not in self.types and name not in ("String", "ByteString", "Buffer"):
                self.fail(f"has type {name!r}, which the schema does not define")
            self.by_id[number] = entry
        self.where = "root"
        if self.root is not None and (type(self.root) is not int or
                                      self.by_id.get(self.root, {}).get("type") != "Root"):
            self.fail(f"names {self.root!r}, which is not the id of a Root object")
        for index, number in enumerate(self.interned):
            self.where = f"interned[{index}]"
            if self.by_id.get(number, {}).get("type") not in ("String", "ByteString") if type(number) is int \
                    else True:
                self.fail(f"names {number!r}, which is not the id of a String or ByteString object")

    def fail(self, message):
        raise LoadError(f"{self.where} {message}" if not message.startswith(":") else f"{self.where}{message}")

    def list_of(self, document, key):
        value = document.get(key)
        if not isinstance(value, list):
            self.where = f"the document's {key!r}"
            self.fail(f"is {type(value).__name__}, not a list")
        return value

    def check_type(self, entry):
        if not isinstance(entry, dict):
            self.fail("is not a JSON object")
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(kind, str):
            kind = repr(kind)
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) \
                or name.startswith("_") or name in _PREDEFINED + ("Structure",) or name in self.types:
            self.fail(f"names a type {name!r}: a type name is a new Python identifier")
        if kind == "structure":
            base = entry.get("base")
            if base != "Structure" and (not isinstance(base, str)
                                        or self.types.get(base, {}).get("kind") != "structure"):
                self.fail(f"({name}) has base {base!r}, which is not Structure or a structure defined before")
            fields = entry.get("fields")
            if not isinstance(fields, list):
                self.fail(f"({name}) has no list of fields")
            for field in fields:
                if not (isinstance(field, list) and len(field) == 2 and isinstance(field[0], str)
                        and field[0].isidentifier() and not keyword.iskeyword(field[0])
                        and not field[0].startswith("_")):
                    self.fail(f"({name}) has a field {field!r}: a field is [name, type]")
                self.check_label(field[1], name)
        elif kind in C.KINDS:
            params = entry.get("params")
            wanted = 1 if kind in ("list", "set") else 2
            if not isinstance(params, list) or len(params) != wanted:
                self.fail(f"({name}) is a {kind} with params {params!r}: it takes {wanted} type(s)")
            for label in params:
                self.check_label(label, name)
        else:
            self.fail(f"({name}) has kind {kind!r}, not structure, list, dict, set or sorteddict")
        self.types[name] = entry

    def check_label(self, label, name):
        if not isinstance(label, str) or (label not in _PREDEFINED and label not in self.types):
            self.fail(f"({name}) uses type {label!r}, which is neither predefined nor defined before")

    # -- building ------------------------------------------------------------------------
    def define(self, storage):
        """(Inside populateSchema) Define every type of the document."""
        schema = storage.schema
        made = {}

        def resolve(label):
            return made[label] if label in made else getattr(schema, label)

        for entry in self.schema:
            name = entry["name"]
            if entry["kind"] == "structure":
                base = schema.Structure if entry["base"] == "Structure" else made[entry["base"]]
                namespace = {field: resolve(label) for field, label in entry["fields"]}
                namespace["__qualname__"] = name
                made[name] = type(base)(name, (base,), namespace)
            else:
                descriptor = C.DESCRIPTORS[entry["kind"]](name)
                params = [resolve(label) for label in entry["params"]]
                made[name] = storage.define(descriptor[params[0] if len(params) == 1 else tuple(params)])

    def build(self, storage):
        """Make every object, then fill in fields and elements; return how many were made."""
        schema = storage.schema
        proxies = {}
        interned = set(self.interned)
        # Leaves first (their contents are all they have), then empty structures and collections.
        for index, entry in enumerate(self.objects):
            self.where = f"objects[{index}] (id {entry['id']})"
            name, number = entry["type"], entry["id"]
            if name == "String":
                text = entry.get("text")
                if not isinstance(text, str):
                    self.fail(": a String needs \"text\", a JSON string")
                proxies[number] = storage.stringRegistry.get(text) if number in interned else schema.String(text)
            elif name in ("ByteString", "Buffer"):
                data = self.base64(entry)
                if name == "ByteString":
                    proxies[number] = (storage.stringRegistry.get(data) if number in interned
                                       else schema.ByteString(data))
                else:
                    proxies[number] = schema.Buffer(self.buffer_source(entry, data))
            elif number == self.root:
                proxies[number] = storage.root
            elif self.types[name]["kind"] == "structure":
                proxies[number] = getattr(schema, name)()
            else:
                proxies[number] = getattr(schema, name)()
        if self.root is not None and type(proxies[self.root]).__name__ != "Root":
            self.fail(": the root is not a Root")

        def value(cell, where):
            if isinstance(cell, dict):
                if set(cell) != {"ref"} or type(cell["ref"]) is not int or cell["ref"] not in proxies:
                    self.where = where
                    self.fail(f": {cell!r} is not a reference to an object of the document")
                return proxies[cell["ref"]]
            if isinstance(cell, str):
                if cell not in _FLOATS:
                    self.where = where
                    self.fail(f": {cell!r} is not a value (strings stand only for NaN, Infinity, -Infinity)")
                return _FLOATS[cell]
            if isinstance(cell, (list,)):
                self.where = where
                self.fail(f": {cell!r} is not a value")
            return cell

        for index, entry in enumerate(self.objects):
            name, number = entry["type"], entry["id"]
            if name in ("String", "ByteString", "Buffer"):
                continue
            where = f"objects[{index}] (id {number}, {name})"
            self.where = where
            proxy = proxies[number]
            if self.types[name]["kind"] == "structure":
                fields = entry.get("fields")
                if not isinstance(fields, dict):
                    self.fail(": a structure needs \"fields\", a JSON object")
                for field, cell in fields.items():
                    self.where = f"{where}.{field}"
                    if field not in type(proxy)._ps_field_types:
                        self.fail(f": {name} has no field {field!r}")
                    setattr(proxy, field, value(cell, self.where))
                continue
            cells = entry.get("items")
            if not isinstance(cells, list):
                self.fail(": a collection needs \"items\", a JSON list")
            kind = self.types[name]["kind"]
            if kind == "list":
                proxy.extend([value(cell, f"{where}[{i}]") for i, cell in enumerate(cells)])
            elif kind == "set":
                for i, cell in enumerate(cells):
                    self.where = f"{where}[{i}]"
                    proxy.add(value(cell, self.where))
            else:
                for i, pair in enumerate(cells):
                    self.where = f"{where}[{i}]"
                    if not isinstance(pair, list) or len(pair) != 2:
                        self.fail(": an item of a dict is [key, value]")
                    key = value(pair[0], self.where)
                    if key in proxy:
                        self.fail(f": the key {pair[0]!r} comes twice")
                    proxy[key] = value(pair[1], self.where)
            if len(proxy) != len(cells):
                self.where = where
                self.fail(f": {len(cells)} items made a {name} of {len(proxy)} (equal elements?)")
        self.where = "the document"
        return len(proxies)

    def base64(self, entry):
        text = entry.get("base64")
        if not isinstance(text, str):
            self.fail(": needs \"base64\", a JSON string")
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            self.fail(f": \"base64\" is not base64 ({exc})")

    def buffer_source(self, entry, data):
        """A buffer-protocol object over ``data`` with the entry's format, itemsize and shape."""
        fmt, itemsize, shape = entry.get("format"), entry.get("itemsize"), entry.get("shape")
        if not isinstance(fmt, str) or not fmt or not fmt.isascii() or "\0" in fmt or len(fmt) > F.MAX_FORMAT:
            self.fail(f": a Buffer's \"format\" {fmt!r} is not a non-empty ASCII string")
        if type(itemsize) is not int or not 0 < itemsize < 1 << 31:
            self.fail(f": a Buffer's \"itemsize\" {itemsize!r} is not a positive int")
        if not isinstance(shape, list) or len(shape) > F.MAX_NDIM or any(
                type(extent) is not int or not 0 <= extent < 1 << 62 for extent in shape):
            self.fail(f": a Buffer's \"shape\" {shape!r} is not a list of at most {F.MAX_NDIM} sizes")
        if math.prod(shape) * itemsize != len(data):
            self.fail(f": a Buffer of shape {shape} and itemsize {itemsize} needs "
                      f"{math.prod(shape) * itemsize} bytes, not {len(data)}")
        block = ctypes.create_string_buffer(data, max(len(data), 1))
        return T.MemoryExporter(ctypes.addressof(block), len(data), itemsize, fmt, shape, True, keep=block)
