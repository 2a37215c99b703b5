"""The ``Storage`` class: one file, its schema, its root and its objects.

``Storage`` ties the layers together: the page file (:mod:`permastruct.pages`),
the allocator, the schema stored in the file, the proxy classes built from it,
reference counts, commit and close.  Subclass it and describe the schema in
``populateSchema``::

    class MyStorage(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                name = self.schema.String
                count = self.schema.Int

The seed's module name is kept: ``from permastruct.storage import Storage,
Structure, StructureMeta``.
"""

import bisect
import contextlib
import struct
import ctypes
import json
import os
import tempfile
import warnings
import weakref

from . import _format as F
from . import _types as T
from . import collections as C
from ._alloc import Allocator
from .buffer import Buffer, buffer_source
from .errors import (CorruptStorageError, ForkedProcessError, IncompleteChangeError, NotAStorageError,
                     PermastructError, ReadOnlyError, SchemaError, StorageClosedError)
from ._commit import check_page_size, check_timeout
from .pages import PageFile
from .strings import ByteString, String, StringRegistry, create_registry
from .structure import Structure, StructureMeta, pop_populating, populating, push_populating

__all__ = ["Storage", "Structure", "StructureMeta"]

DEFAULT_FILE_SIZE = 64 * 1024


DEFAULT_REGISTRY_SIZE = 64


class _ProxyRef(weakref.ref):
    """A weak reference to the one live proxy of the object at ``offset``."""

    __slots__ = ("offset",)


_PREDEFINED = {F.T_BYTESTRING: ByteString, F.T_STRING: String, F.T_BUFFER: Buffer}


class Schema:
    """The types of a storage, as attributes: predefined ones and every defined one.

    >>> p = Storage(None)
    >>> p.schema.Int, p.schema.ByteString.__name__
    (<permastruct value type Int>, 'ByteString')
    """

    def __init__(self, storage):
        self._storage = storage
        for value_type in T.VALUE_TYPES:
            setattr(self, value_type.name, value_type)
        self.Structure = Structure

    def __repr__(self):
        return f"<schema of {self._storage!r}: {', '.join(self._names())}>"

    def _names(self):
        return sorted(name for name in vars(self) if not name.startswith("_"))

    def __dir__(self):
        return self._names()


class Storage:
    """A persistent object store in one memory-mapped file.

    ``Storage(fileName, fileSize=None, stringRegistrySize=None, *, readonly=False,
    sync=True, pageSize=4096)``; ``fileName=None`` makes a volatile store that
    vanishes at close.  See ``docs/tutorial.rst``.
    """

    def __init__(self, fileName, fileSize=None, stringRegistrySize=None, *, readonly=False,
                 sync=True, pageSize=F.DEFAULT_PAGE_SIZE, timeout=0):
        self._closed = True
        self._closing = False
        self._forked = False
        self._changing = 0  # the thread in the middle of a change (see _types.change)
        self._depth = 0  # nested with p.transaction() blocks open
        self.readonly = bool(readonly)
        for name, value in (("fileSize", fileSize), ("stringRegistrySize", stringRegistrySize)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, not {value}")
        check_page_size(pageSize)  # the same arguments are refused the same way on every open
        check_timeout(timeout)
        if fileName is None:
            if readonly:
                raise ValueError("a volatile storage (fileName=None) cannot be read-only")
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            handle, fileName = tempfile.mkstemp(prefix="permastruct-", dir=folder)
            os.close(handle)
            os.unlink(fileName)
            sync = False
            self._volatile = True
        else:
            self._volatile = False
        path = os.fspath(fileName)
        if not isinstance(path, str):
            raise TypeError(f"fileName must be a str or os.PathLike, not {type(fileName).__name__}")
        self.fileName = os.path.abspath(path)
        self.sync = sync
        size = max(fileSize or DEFAULT_FILE_SIZE, F.HEADER_BLOCK + pageSize)
        self._page_file = PageFile(self.fileName, pageSize, readonly=self.readonly, sync=sync,
                                   initial_size=size, timeout=timeout, journal=not self._volatile)
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
        self._mapping = self._page_file.mapping
        self._root = None
        self._proxies = {}  # offset -> _ProxyRef: at most one live proxy per object
        self._unreferenced = set()  # objects whose reference count is 0: freed at commit
        self._freed = []  # objects freed since the last commit (the commit tells readers)
        self._created = set()
        self._exports = weakref.WeakValueDictionary()
        self._views = {}  # offset of a collection's internal object -> its cached views
        self._blanks = {}  # (type id, size) -> the bytes of a new object: header and zeros
        self._classes_by_id = {}
        self._user_types = []  # structures and collections, in definition order
        self.schema = Schema(self)
        try:
            if self._volatile:
                os.unlink(self.fileName)
            self._closed = False
            if created:
                self._create(stringRegistrySize or DEFAULT_REGISTRY_SIZE)
            else:
                self._load()
        except BaseException:
            self._closed = True
            if self._page_file.created:
                self._page_file.abandon()  # a new file goes, an empty one is empty again
            else:
                self._page_file.close(flush=False)
            raise
        self.stringRegistry = StringRegistry(self)
        _OPEN.add(self)
        # Dropped without close(): warn, and give back the file, its locks and its map (what
        # was not committed is lost, as after a crash).  Not at interpreter exit: the process's
        # end releases them anyway.
        self._finalizer = weakref.finalize(self, _collected, self._page_file, repr(self))
        self._finalizer.atexit = False

    @classmethod
    def memory(cls, **kwargs):
        """A volatile store (a file that is deleted as soon as it is opened)."""
        return cls(None, **kwargs)

    # -- creation and loading ----------------------------------------------------
    def _create(self, registry_size):
        pf = self._page_file
        self._allocator = Allocator(pf)
        pf.slots[F.SLOT_ALLOC] = self._allocator.state_pid
        pf.slots[F.SLOT_REGISTRY] = create_registry(self, registry_size)
        self._bind_predefined()
        self._run_populate()
        for type_id, cls in enumerate(self._user_types, F.FIRST_USER_TYPE):
            cls._ps_type_id = type_id
            self._classes_by_id[type_id] = cls
        text = json.dumps(self._describe_schema(), separators=(",", ":")).encode()
        schema = self._new_string(F.T_SCHEMA, text)
        self._incref(schema)
        pf.slots[F.SLOT_SCHEMA] = schema
        pf.flush()

    def _load(self):
        pf = self._page_file
        state = pf.slots[F.SLOT_ALLOC]
        if not 0 <= state < pf.page_count:
            raise CorruptStorageError(f"{self.fileName!r}: the allocator page {state} does not exist")
        self._allocator = Allocator(pf, state)
        self._bind_predefined()
        stored = self._read_schema()
        if type(self).populateSchema is not Storage.populateSchema:
            self._run_populate()
            self._bind_schema(stored)
        else:
            self._build_schema(stored)
        if not self.readonly:  # what the last writer's program held has no holder now
            self._unreferenced.update(self._held_objects())

    def _bind_predefined(self):
        for type_id, base in _PREDEFINED.items():
            cls = T.PersistentMeta(base.__name__, (base,), {"__slots__": (), "_storage": self})
            cls.__module__ = base.__module__
            self._classes_by_id[type_id] = cls
            setattr(self.schema, base.__name__, cls)
        if self.readonly:
            for cls in self._classes_by_id.values():
                cls._ps_readonly = True

    def _run_populate(self):
        push_populating(self)
        try:
            self.populateSchema()
        finally:
            pop_populating()

    def populateSchema(self):
        """Describe the schema; override in a subclass (the base defines no types)."""

    def define(self, type_):
        """Define ``type_`` in the schema and return the type to use for fields.

        ``type_`` is a collection descriptor (``List('Agents')[Agent]``), which
        becomes a new type of the schema, or a predefined type (``Buffer``,
        ``ByteString``, ``String``, value types), for which the storage's own
        version is returned.
        """
        if isinstance(type_, C._Descriptor):
            return self._define_collection(type_)
        resolved = self._field_type(type_)
        if resolved is None:
            raise SchemaError(f"cannot define {type_!r}: expected a permastruct type")
        return resolved

    def _field_type(self, value):
        """The field type ``value`` stands for, or None if it is not a type."""
        if isinstance(value, T.ValueType):
            return value
        if isinstance(value, type) and issubclass(value, T.Persistent):
            if value._storage is self:
                return value
            if value._storage is None and value._ps_type_id in _PREDEFINED:
                return self._classes_by_id[value._ps_type_id]
            if value._storage is not None:
                raise SchemaError(f"{value.__name__} belongs to {value._storage!r}, not to {self!r}")
        return None

    def _define_collection(self, descriptor):
        if populating() is not self:
            raise SchemaError(f"{descriptor!r} must be defined inside {self!r}'s populateSchema()")
        if descriptor.params is None:
            raise SchemaError(f"{descriptor!r} needs its element types: {type(descriptor).__name__}"
                              f"({descriptor.name!r})[{'T' if descriptor.arity == 1 else 'K, V'}]")
        params = []
        for param in descriptor.params:
            resolved = self._field_type(param)
            if resolved is None:
                raise SchemaError(f"{descriptor!r}: {param!r} is not a permastruct type")
            params.append(resolved)
        cls = C.make_class(self, descriptor.kind, descriptor.name, params)
        self._register_type(cls)
        return cls

    def _register_type(self, cls):
        """Add a structure or collection class to the schema under its name."""
        if self._classes_by_id.get(cls._ps_type_id) is cls:
            return
        if hasattr(self.schema, cls.__name__) and cls.__name__ != "Structure":
            raise SchemaError(f"{self!r}: the schema already has a type named {cls.__name__!r}")
        self._user_types.append(cls)
        setattr(self.schema, cls.__name__, cls)

    # -- the schema as data ---------------------------------------------------------
    def _type_name(self, ftype):
        return ftype.name if isinstance(ftype, T.ValueType) else ftype.__name__

    def _describe_schema(self):
        types = []
        for cls in self._user_types:
            if cls._ps_kind in C.KINDS:
                types.append({"id": cls._ps_type_id, "name": cls.__name__, "kind": cls._ps_kind,
                              "params": [self._type_id_of(t) for t in cls._ps_params]})
                continue
            base = cls.__bases__[0]
            types.append({"id": cls._ps_type_id, "name": cls.__name__, "kind": "structure",
                          "base": base._ps_type_id if base is not Structure else F.T_STRUCTURE,
                          "fields": [[name, self._type_id_of(ftype)] for name, ftype in cls._ps_own_fields]})
        return {"format": F.FORMAT_VERSION, "types": types}

    @staticmethod
    def _type_id_of(ftype):
        return ftype.type_id if isinstance(ftype, T.ValueType) else ftype._ps_type_id

    def _read_schema(self):
        offset = self._page_file.slots[F.SLOT_SCHEMA]
        self._check_offset(offset, F.STRING.size)
        kind, _, _, length = self._string_header(offset)
        if kind != F.T_SCHEMA:
            raise CorruptStorageError(f"{self.fileName!r}: no schema at {offset:#x}")
        self._check_offset(offset, F.STRING.size + length)
        try:
            schema = json.loads(bytes(self._mapping.view(offset + F.STRING.size, length)))
            types = schema["types"]
            for entry in types:
                entry["id"], entry["name"] = int(entry["id"]), str(entry["name"])
                if entry.get("kind") in C.KINDS:
                    entry["params"] = [int(type_id) for type_id in entry["params"]]
                    if len(entry["params"]) != C.DESCRIPTORS[entry["kind"]].arity:
                        raise ValueError(f"{entry['name']} has {len(entry['params'])} element types")
                    continue
                entry["base"], entry["fields"] = (
                    int(entry["base"]), [(str(name), int(type_id)) for name, type_id in entry["fields"]])
                if entry.get("kind") != "structure":
                    raise ValueError(f"unknown kind {entry.get('kind')!r}")
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise CorruptStorageError(f"{self.fileName!r}: the stored schema is damaged "
                                      f"({type(exc).__name__}: {exc})") from None
        return types

    def _stored_field_type(self, type_id, where):
        if type_id in T.VALUE_TYPES_BY_ID:
            return T.VALUE_TYPES_BY_ID[type_id]
        if type_id in self._classes_by_id:
            return self._classes_by_id[type_id]
        raise CorruptStorageError(f"{self.fileName!r}: {where} refers to unknown type {type_id}")

    def _build_schema(self, stored):
        """Build plain classes from the stored schema alone (bare ``Storage(path)``)."""
        for entry in stored:
            if entry["id"] in self._classes_by_id or entry["id"] < F.FIRST_USER_TYPE \
                    or not entry["name"].isidentifier() or hasattr(self.schema, entry["name"]):
                raise CorruptStorageError(f"{self.fileName!r}: stored type {entry['name']!r} is inconsistent")
            if entry["kind"] in C.KINDS:
                params = [self._stored_field_type(type_id, f"{entry['name']} element") for type_id in entry["params"]]
                try:
                    cls = C.make_class(self, entry["kind"], entry["name"], params)
                except SchemaError as exc:
                    raise CorruptStorageError(f"{self.fileName!r}: stored schema: {exc}") from None
                cls._ps_type_id = entry["id"]
                self._classes_by_id[entry["id"]] = cls
                setattr(self.schema, entry["name"], cls)
                continue
            base = Structure if entry["base"] == F.T_STRUCTURE else self._classes_by_id.get(entry["base"])
            if base is None or getattr(base, "_ps_kind", None) != "structure":
                raise CorruptStorageError(f"{self.fileName!r}: stored type {entry['name']!r} is inconsistent")
            namespace = {"_ps_storage": self, "__module__": "permastruct.schema"}
            for name, type_id in entry["fields"]:
                if not name.isidentifier():
                    raise CorruptStorageError(f"{self.fileName!r}: stored field name {name!r} is invalid")
                namespace[name] = self._stored_field_type(type_id, f"{entry['name']}.{name}")
            try:
                cls = StructureMeta(entry["name"], (base,), namespace)
            except SchemaError as exc:
                raise CorruptStorageError(f"{self.fileName!r}: stored schema: {exc}") from None
            cls._ps_type_id = entry["id"]
            self._classes_by_id[entry["id"]] = cls

    def _bind_schema(self, stored):
        """Check that the classes of populateSchema agree with the stored schema; bind them."""
        stored_by_name = {entry["name"]: entry for entry in stored}
        defined = {cls.__name__: cls for cls in self._user_types}
        missing = sorted(set(stored_by_name) - set(defined))
        extra = sorted(set(defined) - set(stored_by_name))
        if missing or extra:
            raise SchemaError(f"{self.fileName!r}: schema mismatch: "
                              + "; ".join([f"stored types not defined: {', '.join(missing)}"] * bool(missing)
                                          + [f"types not in the file: {', '.join(extra)}"] * bool(extra)))
        names_by_id = {entry["id"]: entry["name"] for entry in stored}
        names_by_id.update({t.type_id: t.name for t in T.VALUE_TYPES})
        names_by_id.update({type_id: cls.__name__ for type_id, cls in _PREDEFINED.items()})
        names_by_id[F.T_STRUCTURE] = "Structure"
        for name, cls in defined.items():
            entry = stored_by_name[name]
            if cls._ps_kind in C.KINDS or entry["kind"] in C.KINDS:
                python_params = [self._type_name(t) for t in cls._ps_params] if cls._ps_kind in C.KINDS else None
                stored_params = [names_by_id.get(type_id, f"type {type_id}") for type_id in entry.get("params", ())]
                if cls._ps_kind != entry["kind"] or python_params != stored_params:
                    raise SchemaError(f"{self.fileName!r}: {name} is {_kind_text(cls._ps_kind, python_params)} "
                                      f"in Python but {_kind_text(entry['kind'], stored_params)} in the file")
                continue
            base = cls.__bases__[0]
            if names_by_id.get(entry["base"]) != base.__name__:
                raise SchemaError(f"{self.fileName!r}: {name} derives from {base.__name__} in Python "
                                  f"but from {names_by_id.get(entry['base'])} in the file")
            python_fields = [(field, self._type_name(ftype)) for field, ftype in cls._ps_own_fields]
            stored_fields = [(field, names_by_id.get(type_id, f"type {type_id}"))
                             for field, type_id in entry["fields"]]
            if python_fields != stored_fields:
                raise SchemaError(f"{self.fileName!r}: fields of {name} differ: Python has "
                                  f"{_fields_text(python_fields)}, the file has {_fields_text(stored_fields)}")
        for cls in self._user_types:
            cls._ps_type_id = stored_by_name[cls.__name__]["id"]
            self._classes_by_id[cls._ps_type_id] = cls

    # -- objects ------------------------------------------------------------------
    def _check_offset(self, offset, size=8):
        pf = self._page_file
        end = F.HEADER_BLOCK + pf.page_count * pf.page_size
        if offset < F.HEADER_BLOCK or offset % 8 or offset + size > end:
            raise CorruptStorageError(f"{self.fileName!r}: reference {offset:#x} (+{size} bytes) is "
                                      f"outside the file's {pf.page_count} pages")

    def _string_header(self, offset):
        return F.STRING.unpack_from(self._mapping.view(offset, F.STRING.size))

    def _proxy(self, offset):
        """The proxy of the object at ``offset`` (its class chosen by the stored type id)."""
        ref = self._proxies.get(offset)
        if ref is not None:
            proxy = ref()
            if proxy is not None and not type(proxy)._ps_closed:
                return proxy
        if self._closed:
            raise StorageClosedError(f"{self!r} is closed")
        return self._adopt(offset, self._load_proxy(offset))

    def _adopt(self, offset, proxy):
        """Remember ``proxy`` as the live proxy of the object at ``offset``."""
        self._proxies[offset] = ref = _ProxyRef(proxy, self._forget_proxy)
        ref.offset = offset
        return proxy

    def _forget_proxy(self, ref):
        if self._proxies.get(ref.offset) is ref:
            del self._proxies[ref.offset]

    def _live_proxy(self, offset):
        ref = self._proxies.get(offset)
        return ref() if ref is not None else None

    def _load_proxy(self, offset):
        self._check_offset(offset)
        type_id = F.UINT32.unpack_from(self._mapping.view(offset, 4))[0]
        cls = self._classes_by_id.get(type_id)
        if cls is None:
            raise CorruptStorageError(f"{self.fileName!r}: the object at {offset:#x} has unknown type {type_id}")
        self._check_offset(offset, ctypes.sizeof(cls))
        return self._mapping.from_buffer(cls, offset)

    def _offset(self, proxy):
        return self._mapping.offset_of_address(ctypes.addressof(proxy))

    def _new_object(self, cls, size):
        """A new zeroed object of ``cls`` (``size`` bytes, header included), not yet referenced."""
        self._check_writable()
        blank = self._blanks.get((cls._ps_type_id, size))
        if blank is None and size <= 1024:  # made once per type and size: the header, then zeros
            blank = self._blanks[cls._ps_type_id, size] = (F.OBJECT_HEADER.pack(cls._ps_type_id, 0)
                                                           + bytes(size - F.OBJECT_HEADER.size))
        if blank is not None:
            offset = self._allocator.alloc(size, zero=False)
            self._mapping.view(offset, size)[:] = blank
        else:  # a large object: the allocator zeroes it a piece at a time
            offset = self._allocator.alloc(size)
            F.OBJECT_HEADER.pack_into(self._mapping.view(offset, 8), 0, cls._ps_type_id, 0)
        self._created.add(offset)
        self._unreferenced.add(offset)
        return offset


    @T.storage_change
    def _new_structure(self, cls, fields):
        unknown = [name for name in fields if name not in cls._ps_field_types]
        if unknown:
            raise TypeError(f"{cls.__name__}() got unexpected field(s) {', '.join(map(repr, unknown))}; "
                            f"fields are: {', '.join(cls._ps_field_types) or 'none'}")
        offset = self._new_object(cls, cls._ps_size)
        proxy = self._mapping.from_buffer(cls, offset)
        try:
            for name, value in fields.items():
                setattr(proxy, name, value)
        except BaseException:
            self._free_object(offset)
            raise
        return self._adopt(offset, proxy)

    @T.storage_change
    def _construct(self, cls, *args, **kwargs):
        """``p.schema.ByteString(b"...")``, ``p.schema.String("...")``, ``p.schema.Buffer(obj)``,
        ``p.schema.Agents([...])`` and the other collections."""
        if cls._ps_kind in C.KINDS:
            if len(args) > 1:
                raise TypeError(f"{cls.__name__}() takes at most one positional argument ({len(args)} given)")
            self._check_writable()
            offset = cls._ps_build(self, args[0] if args else None, **kwargs)
            return self._adopt(offset, self._mapping.from_buffer(cls, offset))
        if kwargs or len(args) != 1:
            raise TypeError(f"{cls.__name__}() takes exactly one positional argument")
        offset = self._coerce(cls, args[0], f"{cls.__name__}()")
        return self._adopt(offset, self._mapping.from_buffer(cls, offset))

    def _new_string(self, type_id, data, references=0):
        """A new string object holding ``data``; with ``references=1`` the caller stores it at once."""
        if len(data) >= 1 << 32:
            raise OverflowError(f"a persistent string holds at most 4 GiB, not {len(data)} bytes")
        self._check_writable()
        offset = self._allocator.alloc(F.STRING.size + len(data), zero=False)
        view = self._mapping.view(offset, F.STRING.size + len(data))
        F.STRING.pack_into(view, 0, type_id, references, F.string_hash(type_id, data), len(data))
        view[F.STRING.size:] = data
        self._created.add(offset)
        if not references:
            self._unreferenced.add(offset)
        return offset

    def _new_buffer(self, obj):
        source = buffer_source(obj)
        fmt = source.format.encode("ascii", "replace")
        if len(fmt) > F.MAX_FORMAT or source.ndim > F.MAX_NDIM:
            raise ValueError(f"a buffer's format is at most {F.MAX_FORMAT} characters and its ndim at most "
                             f"{F.MAX_NDIM}, not {len(fmt)} and {source.ndim}")
        shape_at, data_offset = F.buffer_layout(len(fmt), source.ndim)
        nbytes = source.nbytes
        self._check_writable()
        offset = self._allocator.alloc(data_offset + nbytes, zero=False)
        view = self._mapping.view(offset, data_offset + nbytes)
        view[:data_offset] = bytes(data_offset)
        F.BUFFER.pack_into(view, 0, F.T_BUFFER, 0, nbytes, data_offset, source.itemsize, source.ndim,
                           len(fmt) & 0xFF, len(fmt) >> 8)
        view[F.BUFFER.size:F.BUFFER.size + len(fmt)] = fmt
        for index, extent in enumerate(source.shape or ()):
            F.UINT64.pack_into(view, shape_at + 8 * index, extent)
        if source.c_contiguous:
            try:
                view[data_offset:] = source.cast("B") if source.ndim else source.tobytes()
            except (TypeError, ValueError):
                view[data_offset:] = source.tobytes()
        else:
            view[data_offset:] = source.tobytes()
        self._created.add(offset)
        self._unreferenced.add(offset)
        return offset

    def _coerce(self, ftype, value, where):
        """A new object of field type ``ftype`` made from a plain Python ``value``."""
        kind = ftype._ps_kind
        if kind == "string":
            if ftype._ps_type_id == F.T_STRING and isinstance(value, str):
                return self._new_string(F.T_STRING, value.encode("utf-8"))
            if ftype._ps_type_id == F.T_BYTESTRING and isinstance(value, (bytes, bytearray, memoryview)):
                return self._new_string(F.T_BYTESTRING, bytes(value))
        elif kind == "buffer" and not isinstance(value, str):
            return self._new_buffer(value)
        elif kind in C.KINDS:
            return ftype._ps_from_python(self, value, where)
        raise TypeError(f"{where} holds {ftype.__name__}: cannot store a value of type {type(value).__name__}")

    def _coerce_check(self, ftype, value, where):
        """Raise the TypeError ``_coerce`` would raise for ``value``, without creating anything."""
        kind = ftype._ps_kind
        if kind == "string":
            python = str if ftype._ps_type_id == F.T_STRING else (bytes, bytearray, memoryview)
            if isinstance(value, python):
                return
        elif kind == "buffer" and not isinstance(value, str):
            buffer_source(value).release()
            return
        elif kind in C.KINDS and ftype._ps_accepts(value):
            return
        raise TypeError(f"{where} holds {ftype.__name__}: cannot store a value of type {type(value).__name__}")

    def _reference_check(self, ftype, value, where):
        """Check that proxy ``value`` may be stored where ``ftype`` is expected; return its offset."""
        if type(value)._ps_closed:
            value._ps_type  # a dead proxy raises its own error here
        if type(value)._storage is not self:
            raise ValueError(f"{where}: {value!r} belongs to {type(value)._storage!r}, not to {self!r}")
        if not isinstance(value, ftype):
            raise TypeError(f"{where} holds {ftype.__name__}, not {type(value).__name__}")
        return self._offset(value)

    def _reference_to(self, ftype, value, where):
        """The offset to store for ``value`` in a by-reference slot of type ``ftype`` (0 for None).

        A proxy is checked; a plain Python value becomes a new object.  The
        caller increfs the result once it is stored.
        """
        if value is None:
            return 0
        if isinstance(value, T.Persistent):
            return self._reference_check(ftype, value, where)
        return self._coerce(ftype, value, where)

    def _string_data(self, offset):
        """The bytes of the string object at ``offset`` (a hot path of sorted-key searches).

        An object never spans two segments, so bounding the read by the
        segment keeps a damaged offset from reading outside the map.
        """
        try:
            segment = self._mapping.segment_of(offset)
        except IndexError:
            raise CorruptStorageError(f"{self.fileName!r}: string {offset:#x} is outside the file") from None
        start = offset - segment.start + F.STRING.size
        if start > segment.length:
            raise CorruptStorageError(f"{self.fileName!r}: string {offset:#x} crosses the end of a segment")
        end = start + F.UINT32.unpack_from(segment.map, start - 4)[0]
        if end > segment.length:
            raise CorruptStorageError(f"{self.fileName!r}: string {offset:#x} crosses the end of a segment")
        return segment.map[start:end]

    def _string_equals(self, offset, data):
        """Whether the string object at ``offset`` holds ``data`` (a hot path of lookups).

        An object never spans two segments, so bounding the read by the
        segment keeps a damaged offset from reading outside the map.
        """
        mapping = self._mapping  # MappedFile.segment_of, inline (an offset below 0 gives local < 0)
        segment = mapping.segments[bisect.bisect_right(mapping._starts, offset) - 1]
        local = offset - segment.start
        if local < 0 or local >= segment.length:
            raise CorruptStorageError(f"{self.fileName!r}: string {offset:#x} is outside the file")
        if local + F.STRING.size > segment.length:
            raise CorruptStorageError(f"{self.fileName!r}: string {offset:#x} crosses the end of a segment")
        length = F.UINT32.unpack_from(segment.map, local + 12)[0]
        if length != len(data):
            return False
        start = local + F.STRING.size
        if start + length > segment.length:
            raise CorruptStorageError(f"{self.fileName!r}: string {offset:#x} crosses the end of a segment")
        return segment.map[start:start + length] == data

    def _drop_internal(self, offset):
        """Free a collection's internal object at once (it was replaced or emptied)."""
        self._views.pop(offset, None)
        self._allocator.free(offset)

    def _ref_setter(self, cls, name, ftype):
        """The write function of by-reference field ``cls.name`` (reference counts included)."""
        hidden = getattr(cls, "_ps_ref_" + name)
        get, put = hidden.__get__, hidden.__set__
        where = f"{cls.__name__}.{name}"

        reference_to, new_string = self._reference_to, self._new_string
        # A plain str (String) or bytes (ByteString) becomes a new string object
        # that starts with its one reference: the common case, without _coerce.
        exact = None
        if ftype._ps_kind == "string":
            exact = str if ftype._ps_type_id == F.T_STRING else bytes if ftype._ps_type_id == F.T_BYTESTRING else None
        type_id = ftype._ps_type_id

        def set_reference(proxy, value):
            if type(value) is exact:
                new = new_string(type_id, value if exact is bytes else value.encode("utf-8"), 1)
            else:
                new = reference_to(ftype, value, where)
                if new:
                    self._incref(new)
            old = get(proxy)
            put(proxy, new)
            if old:
                self._decref(old)
        return T.change(set_reference)

    # -- reference counts -----------------------------------------------------------
    def _incref(self, offset):
        view = self._mapping.view(offset + 4, 4)
        count = F.UINT32.unpack_from(view)[0]
        if count == 0xFFFFFFFF:
            raise OverflowError(f"the object at {offset:#x} has too many references")
        F.UINT32.pack_into(view, 0, count + 1)

    def _decref(self, offset):
        view = self._mapping.view(offset + 4, 4)
        count = F.UINT32.unpack_from(view)[0]
        if count == 0:
            raise CorruptStorageError(f"{self.fileName!r}: reference count of {offset:#x} is already 0")
        F.UINT32.pack_into(view, 0, count - 1)
        if count == 1:
            self._unreferenced.add(offset)

    def _refcount(self, offset):
        return F.UINT32.unpack_from(self._mapping.view(offset + 4, 4))[0]

    def references(self, offset):
        """The offsets referenced by the object at ``offset`` (for freeing and checking)."""
        type_id = F.UINT32.unpack_from(self._mapping.view(offset, 4))[0]
        if type_id in C.INTERNAL_TYPES:
            type_id = F.UINT32.unpack_from(self._mapping.view(offset + 8, 4))[0]
            owner = self._classes_by_id.get(type_id)
            if owner is None or owner._ps_kind not in C.KINDS:
                raise CorruptStorageError(f"{self.fileName!r}: the internal object at {offset:#x} names "
                                          f"owner type {type_id}")
            return owner._ps_references(self, offset, F.UINT32.unpack_from(self._mapping.view(offset, 4))[0])
        cls = self._classes_by_id.get(type_id)
        if cls is not None and cls._ps_kind in C.KINDS:
            return cls._ps_references(self, offset, type_id)
        if cls is None or cls._ps_kind != "structure":
            return []
        proxy = self._mapping.from_buffer(cls, offset)
        return [target for target in (getattr(proxy, "_ps_ref_" + name)
                                      for name, ftype in cls._ps_field_types.items()
                                      if not isinstance(ftype, T.ValueType)) if target]

    def _free_object(self, offset):
        """Free the object at ``offset`` now; what it referenced loses a reference."""
        for child in self.references(offset):
            self._decref(child)
        self._unreferenced.discard(offset)
        self._views.pop(offset, None)
        self._kill_proxy(offset, rolled_back=not self._closing)
        self._allocator.free(offset)
        self._freed.append(offset)

    def _collect_unreferenced(self, everything=False):
        """Free the objects that nothing in the file references and no live proxy holds.

        Freeing is deferred to commit so that an object can move between
        fields (``a.x, a.y = a.y, a.x``) inside a transaction.
        """
        pending, held = self._unreferenced, []
        while pending:  # freeing an object may add what it referenced: one pass, like a worklist
            offset = pending.pop()
            if self._refcount(offset):
                continue  # stored somewhere again
            if not everything and self._live_proxy(offset) is not None:
                held.append(offset)
                continue
            self._free_object(offset)
        pending.update(held)

    def _held_objects(self):
        """The offsets the committed file records as held by a program and referenced by nothing."""
        offset = self._page_file.slots[F.SLOT_HELD]
        if not offset:
            return []
        self._check_offset(offset, F.HELD.size)
        type_id, _, count = F.HELD.unpack_from(self._mapping.view(offset, F.HELD.size))
        if type_id != F.T_HELD:
            raise CorruptStorageError(f"{self.fileName!r}: root slot {F.SLOT_HELD} does not name the list of "
                                      f"held objects (type {type_id} at {offset:#x})")
        self._check_offset(offset, F.HELD.size + 8 * count)
        held = list(self._mapping.view(offset + F.HELD.size, 8 * count).cast("Q"))
        for target in held:
            self._check_offset(target)
        return held

    def _record_held(self):
        """(Commit) Record in the file the objects nothing references that live proxies still hold.

        Without it they would outlive a crash or a rollback as allocated space
        nothing knows of; recorded, the next writer's open (or the rollback)
        frees them.  Nothing is written when the set did not change.
        """
        held = sorted(self._unreferenced)
        pf = self._page_file
        old = pf.slots[F.SLOT_HELD]
        if held == self._held_objects():
            return
        new = 0
        if held:
            new = self._allocator.alloc(F.HELD.size + 8 * len(held), zero=False)
            view = self._mapping.view(new, F.HELD.size + 8 * len(held))
            F.HELD.pack_into(view, 0, F.T_HELD, 1, len(held))
            view[F.HELD.size:] = struct.pack(f"<{len(held)}Q", *held)
        pf.slots[F.SLOT_HELD] = new
        if old:
            self._allocator.free(old)

    def _exported(self, view):
        self._exports[id(view)] = view

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
    def root(self):
        """The instance of the schema's ``Root`` structure, created on first access."""
        self._check_open()
        if self._root is not None:
            return self._root
        offset = self._page_file.slots[F.SLOT_ROOT]
        if offset:
            root = self._proxy(offset)
        else:
            cls = getattr(self.schema, "Root", None)
            if not isinstance(cls, StructureMeta):
                raise SchemaError(f"{self!r}: the schema has no Root structure; define "
                                  "'class Root(self.schema.Structure)' in populateSchema()")
            if self.readonly:
                raise ReadOnlyError(f"{self!r} is read-only and its root was never created")
            root = cls()
            offset = self._offset(root)
            self._incref(offset)
            self._page_file.slots[F.SLOT_ROOT] = offset
        self._root = root
        return root

    @property
    def closed(self):
        return self._closed

    def commit(self):
        """Make every change since the last commit durable.

        Either it returns and the commit is made, or it raises (a full disk,
        an interrupt at any moment) and nothing of it is: the store is at its
        last commit, with the changes still pending (``rollback()`` or commit
        again).
        """
        self._check_writable()
        self._check_whole()
        self._changing = T._get_ident()  # a commit is one change: no other thread's meanwhile
        self._collect_unreferenced()  # (cut short, this leaves _changing set: a rollback is due)
        self._record_held()
        pf = self._page_file
        try:
            pf.commit(acknowledge=False, freed=self._freed)
            # The commit returns here: the storage's own bookkeeping and the engine's
            # confirmation in one step (no call in between, so no interrupt either).
            self._created, self._freed, pf._unacknowledged, self._changing = set(), [], None, 0
        except BaseException:
            self._changing = 0
            pf.settle()  # not confirmed: taken back; the changes are pending as before
            raise

    def _check_whole(self):
        """Refuse to commit while a change is running in another thread or was cut short here."""
        if self._changing:
            if self._changing != T._get_ident():
                T.begin_change(self)  # raises ConcurrentUseError
            raise IncompleteChangeError(
                f"{self!r}: a change was interrupted before it finished (a KeyboardInterrupt or a "
                "MemoryError inside it), so this transaction holds half of it and cannot be committed; "
                "call rollback(): the store is at its last commit")

    def rollback(self):
        """Return to the last committed state; proxies of objects created since then die."""
        self._check_writable()
        if self._changing and self._changing != T._get_ident():
            T.begin_change(self)  # raises ConcurrentUseError
        created = self._created
        for offset in list(created):  # first; each one leaves the set only once it is dead, so a
            self._kill_proxy(offset, rolled_back=True)  # rollback cut short kills the rest on retry
            created.discard(offset)
        self._page_file.discard()
        self._views.clear()
        self._freed = []
        self._unreferenced = set(self._held_objects())  # the committed state's: freed at the next commit
        self._root = None
        self._changing = 0

    def refresh(self):
        """(``readonly=True``) Move to the latest commit; return whether anything changed.

        Proxies stay usable; a proxy whose object the writer has since freed
        (its type in the file changed) dies like a closed one.  A writable
        storage always sees its own latest state: there this returns False.
        """
        self._check_open()
        if not self._page_file.refresh():
            return False
        self._views.clear()
        self._root = None
        freed = self._page_file.freed
        for offset, ref in list(self._proxies.items()):
            proxy = ref()
            if proxy is not None and (offset in freed or self._type_at(offset) != type(proxy)._ps_type_id):
                self._kill_proxy(offset, rolled_back="freed")
        return True

    def _type_at(self, offset):
        try:
            return F.UINT32.unpack_from(self._mapping.view(offset, 4))[0]
        except IndexError:
            return None

    @contextlib.contextmanager
    def transaction(self):
        """``with p.transaction():`` commits on success and rolls back on an exception.

        Nested blocks are savepoints: a failing inner block undoes only what it
        did (and its objects' proxies die), a succeeding one keeps its changes
        for the outer block; only the outermost block commits.  Entering a
        nested block copies the pages the transaction has changed so far.

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
        self._check_writable()
        if self._depth:
            point = self._savepoint()
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                self._rollback_to(point)
                raise
            self._depth -= 1
            return
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            self.rollback()
            raise
        self._depth = 0
        self.commit()

    def _savepoint(self):
        """Everything :meth:`_rollback_to` needs to return to this moment of the transaction."""
        self._check_whole()
        return (self._page_file.savepoint(), set(self._created), set(self._unreferenced), list(self._freed))

    def _rollback_to(self, point):
        """Return to a :meth:`_savepoint` (one change: cut short, a rollback is due)."""
        self._check_writable()
        if self._changing and self._changing != T._get_ident():
            T.begin_change(self)  # raises ConcurrentUseError
        engine_point, created, unreferenced, freed = point
        if engine_point[2] != self._page_file.txn:  # a commit() inside the block: the point is gone
            return self.rollback()
        self._changing = T._get_ident()
        for offset in list(self._created - created):  # objects made since die first (as in rollback)
            self._kill_proxy(offset, rolled_back=True)
            self._created.discard(offset)
        self._page_file.rollback_to(engine_point)
        self._views.clear()
        self._root = None
        self._unreferenced, self._freed, self._changing = set(unreferenced), list(freed), 0

    def _kill_proxy(self, offset, rolled_back=False):
        ref = self._proxies.get(offset)
        proxy = ref() if ref is not None else None
        if proxy is not None:  # dead first, then forgotten (_proxy takes a dead one for none)
            object.__setattr__(proxy, "__class__", T.closed_class(type(proxy), rolled_back))
        self._proxies.pop(offset, None)

    def close(self):
        """Commit what is pending and release the file; calling it again does nothing."""
        if self._closed:
            return
        if self._changing and self._changing != T._get_ident():
            T.begin_change(self)  # another thread is in the middle of a change: ConcurrentUseError
        incomplete = bool(self._changing)
        self._closing = True
        _OPEN.discard(self)
        self._finalizer.detach()
        try:
            if not self.readonly and not self._page_file.sync_failed and not self._forked and not incomplete:
                self._changing = T._get_ident()
                self._collect_unreferenced(everything=True)
                self._record_held()  # (now nothing)
                self._page_file.commit(freed=self._freed)
                self._freed = []
                self._page_file.close()  # checkpoints, removes the log if it can
                self._changing = 0
        finally:
            self._closed = True
            self._root = None
            self._views.clear()
            for offset in list(self._proxies):
                self._kill_proxy(offset)
            for view in list(self._exports.values()):
                with contextlib.suppress(BufferError, ValueError):
                    view.release()
            self._page_file.close(flush=False)  # (after an exception: what was not committed is not)
        if incomplete:
            raise IncompleteChangeError(
                f"{self!r} was closed without committing: a change had been interrupted before it "
                "finished (a KeyboardInterrupt or a MemoryError inside it); the store is at its last commit")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._closed and not self.readonly:
            with contextlib.suppress(PermastructError, OSError):
                self.rollback()
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.fileName!r}>"

    def check(self, progress=None):
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
        return summary

    def readers(self):
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
    def fileSize(self):
        """The size of the file in bytes."""
        self._check_open()
        return self._page_file.io.size()


_OPEN = weakref.WeakSet()  # the open storages of this process


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
        storage._finalizer.detach()  # the parent owns the file, its locks and its log
        message = (f"{storage!r} was opened before this process was forked: a forked child cannot use "
                   "it or its objects (the parent owns its locks and its changes); open the file again "
                   "in the child, after the parent has closed it")
        for cls in list(storage._classes_by_id.values()):
            T.refuse_all(cls, ForkedProcessError, message)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _kind_text(kind, params):
    if kind not in C.KINDS:
        return "a structure"
    return f"a {kind} of ({', '.join(params or ())})"


def _fields_text(fields):
    return "(" + ", ".join(f"{name}: {type_name}" for name, type_name in fields) + ")" if fields else "no fields"

