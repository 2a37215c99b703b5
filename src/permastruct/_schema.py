"""The schema of a storage: its types in Python, the same types as data in the file, and binding the two.

Layer 9 of the architecture (``docs/architecture.rst``).  :class:`Schema` is
``p.schema``, the namespace of a storage's types (the predefined ones and
every one ``populateSchema`` defines); its underscore methods do the work:

* on a new store, ``populateSchema`` runs, the classes it creates join the
  schema (in definition order, type ids from ``FIRST_USER_TYPE`` up) and the
  schema is written as JSON text (``_describe``) into an object in root
  slot ``SLOT_SCHEMA``;
* on a later open by a class with a ``populateSchema``, it runs again and
  its classes are *bound* to the stored types (``_bind``): they must agree
  with the file, or ``SchemaError`` says how they differ;
* opened with the bare ``Storage(path)``, plain classes are built from the
  stored schema alone (``_build``).

Nothing in the file is code: the stored schema is names and type ids, and
every name read from it is checked (``str.isidentifier``) before it becomes
a class or a field.
"""

import ctypes
import json
from typing import TYPE_CHECKING, Any

from . import _format as F
from . import _types as T
from . import collections as C
from .buffer import Buffer
from .errors import CorruptStorageError, SchemaError
from .strings import ByteString, String, new_string
from .structure import (Layout, Structure, StructureMeta, evaluate_annotation, forward_class, not_a_type, shown,
                        old_version_class, pop_populating, populating, push_populating)

__all__ = ["Schema"]

PREDEFINED = {F.T_BYTESTRING: ByteString, F.T_STRING: String, F.T_BUFFER: Buffer}


class Schema:
    """The types of a storage, as attributes: predefined ones and every defined one.

    >>> from permastruct import Storage
    >>> p = Storage(None)
    >>> p.schema.Int, p.schema.ByteString.__name__
    (<permastruct value type Int>, 'ByteString')
    """

    def __init__(self, storage):
        self._storage = storage
        self._user_types = []  # structures and collections, in definition order
        self._forwards = []  # placeholders of the names in quotes, until populateSchema returns
        self._templates = {}  # module-level structure class -> this storage's class of it
        self._binding = set()  # the module-level classes being bound now
        self._layouts = {}  # type id of an earlier version of a structure type -> its Layout
        self._stored_by_name = {}  # (reopen) the stored types by name, while populateSchema runs
        self._schema_at = 0  # the offset of the stored schema this namespace knows
        for value_type in T.VALUE_TYPES:
            setattr(self, value_type.name, value_type)
        self.Structure = Structure

    def __repr__(self):
        return f"<schema of {self._storage!r}: {', '.join(self._names())}>"

    if TYPE_CHECKING:  # the types are attributes set at run time: any name, for a type checker
        def __getattr__(self, name: str) -> Any: ...

    def _names(self):
        return sorted(name for name in vars(self) if not name.startswith("_"))

    def __dir__(self):
        return self._names()

    @property
    def _classes(self):
        return self._storage._heap.classes

    # -- describing the schema in Python ---------------------------------------------------
    def _bind_predefined(self):
        """The storage's own ByteString, String and Buffer classes."""
        storage = self._storage
        for type_id, base in PREDEFINED.items():
            cls = T.PersistentMeta(base.__name__, (base,), {"__slots__": (), "_storage": storage,
                                                            "_heap": storage._heap})
            cls.__module__ = base.__module__
            self._classes[type_id] = cls
            setattr(self, base.__name__, cls)
        self._classes[F.T_FORWARD] = forward_class(storage, self._layouts)
        if storage.readonly:
            for cls in self._classes.values():
                cls._ps_readonly = True

    def _run_populate(self):
        """Run ``populateSchema``; then the names in quotes it used stand for their types."""
        storage = self._storage
        push_populating(storage)
        try:
            storage.populateSchema()
        finally:
            pop_populating()
        self._resolve()

    def _define(self, type_):
        """``Storage.define``: a collection descriptor becomes a new type; a predefined type, the
        storage's own version of it."""
        if isinstance(type_, C._Descriptor):
            return self._define_collection(type_)
        if isinstance(type_, StructureMeta) and type_.__dict__.get("_ps_module_level"):
            return self._bind_template(type_)
        resolved = self._field_type(type_)
        if resolved is None:
            raise SchemaError(f"cannot define {type_!r}: expected a permastruct type")
        return resolved

    def _field_type(self, value):
        """The field type ``value`` stands for, or None if it is not a type."""
        storage = self._storage
        if isinstance(value, (T.ValueType, _Forward)):
            return value
        if isinstance(value, type) and issubclass(value, T.Persistent):
            if value._storage is storage:
                return value
            if value.__dict__.get("_ps_module_level"):
                if value in self._binding:  # it refers to itself (or to a class binding it): by name
                    return self._forward(value.__name__, f"a field of type {value.__name__}")
                return self._bind_template(value)
            if value._storage is None and value._ps_type_id in PREDEFINED:
                return self._classes[value._ps_type_id]
            if value._storage is not None:
                raise SchemaError(f"{value.__name__} belongs to {value._storage!r}, not to {storage!r}")
        return None

    def _class_field_type(self, owner, attr, value):
        """The field type that class attribute ``owner.attr = value`` declares, or None when the
        attribute is not a field (a method, a property, a constant).

        A name in quotes stands for a type of the schema (resolved when
        ``populateSchema`` returns); a collection descriptor is defined on the
        spot; a Python type, a builtin type or a permastruct class that is not
        a type of this storage is a SchemaError naming the attribute.
        """
        where = f"{owner}.{attr}"
        if isinstance(value, str):
            return self._forward(value, where)
        try:
            if isinstance(value, C._Descriptor):
                return self._collection_field(value)
            ftype = self._field_type(value)
        except SchemaError as exc:
            raise SchemaError(f"{where}: {exc}") from None
        if ftype is None:
            hint = _not_a_type(value)
            if hint is not None:
                raise SchemaError(f"{where} = {shown(value)} is not a field type of {self._storage!r}: {hint}")
        return ftype

    def _bind_template(self, template):
        """The class of this storage for module-level structure class ``template`` (made once, inside
        populateSchema): a subclass of it, laid out like a class written inside populateSchema."""
        bound = self._templates.get(template)
        if bound is not None:
            return bound
        if populating() is not self._storage:
            raise SchemaError(f"{template.__name__} is a module-level structure class: define it with "
                              f"self.define({template.__name__}) inside {self._storage!r}'s populateSchema()")
        parent = next(b for b in template.__bases__ if isinstance(b, StructureMeta))
        bases = (template,) if parent is Structure else (self._bind_template(parent), template)
        namespace = {"__module__": template.__module__, "__qualname__": template.__qualname__,
                     "_ps_binding": True}
        if template.__doc__:
            namespace["__doc__"] = template.__doc__
        for attr, value, annotated in template._ps_declared:
            namespace[attr] = _annotation(template, value) if annotated and isinstance(value, str) else value
        self._binding.add(template)
        try:
            bound = StructureMeta(template.__name__, bases, namespace)
        finally:
            self._binding.discard(template)
        self._templates[template] = bound
        return bound

    def _collection_field(self, descriptor):
        """A collection descriptor used as a field type: the type it defines (defined now, or earlier
        under the same name with the same element types)."""
        existing = getattr(self, descriptor.name, None)
        if (descriptor.params is not None and getattr(existing, "_ps_kind", None) == descriptor.kind
                and existing._storage is self._storage
                and all(self._field_type(p) is q if not isinstance(p, str) else getattr(q, "__name__", None) == p
                        for p, q in zip(descriptor.params, existing._ps_params))):
            return existing
        return self._define_collection(descriptor)

    def _forward(self, type_name, where):
        """A placeholder for the type named ``type_name`` in quotes (``next = "Node"``)."""
        if not type_name.isidentifier():
            raise SchemaError(f"{where} = {type_name!r}: a field type in quotes is the name of a type "
                              "of the schema (next = \"Node\"), and this is not a name")
        placeholder = _Forward(type_name, where)
        self._forwards.append(placeholder)
        return placeholder

    def _resolve(self):
        """Replace every name in quotes (fields, collection element types) by the type it names."""
        forwards, self._forwards = self._forwards, []
        if not forwards:
            return
        storage = self._storage
        resolved = {}
        for placeholder in forwards:
            target = getattr(self, placeholder.__name__, None) if placeholder.__name__ in vars(self) else None
            if isinstance(target, T.ValueType):
                raise SchemaError(f"{placeholder.where} = {placeholder.__name__!r}: {target.name} is a by-value "
                                  f"type; name it without quotes ({target.name}, not {placeholder.__name__!r})")
            if not (isinstance(target, type) and issubclass(target, T.Persistent) and target._storage is storage):
                known = ", ".join(cls.__name__ for cls in self._user_types) or "none"
                raise SchemaError(f"{placeholder.where} = {placeholder.__name__!r} names no type of the schema "
                                  f"of {storage!r} (its types: {known})")
            resolved[placeholder] = target
        self._apply(resolved)

    def _apply(self, resolved):
        """Put the types that placeholders stand for (``resolved``) into the classes that use them."""
        storage = self._storage
        for cls in self._user_types:
            if cls._ps_kind == "structure":
                if any(ftype in resolved for ftype in cls._ps_field_types.values()):
                    cls._ps_resolve(resolved)
            elif any(param in resolved for param in cls._ps_params):
                cls._ps_params = tuple(resolved.get(param, param) for param in cls._ps_params)
                cls._ps_prepare(storage._heap)

    def _define_collection(self, descriptor):
        storage = self._storage
        if populating() is not storage:
            raise SchemaError(f"{descriptor!r} must be defined inside {storage!r}'s populateSchema()")
        if descriptor.params is None:
            raise SchemaError(f"{descriptor!r} needs its element types: {type(descriptor).__name__}"
                              f"({descriptor.name!r})[{'T' if descriptor.arity == 1 else 'K, V'}]")
        params = []
        for param in descriptor.params:
            if isinstance(param, str):
                params.append(self._forward(param, f"{descriptor!r}"))
                continue
            resolved = self._field_type(param)
            if resolved is None:
                raise SchemaError(f"{descriptor!r}: {shown(param)} is not a permastruct type")
            params.append(resolved)
        cls = C.make_class(storage, descriptor.kind, descriptor.name, params)
        self._register(cls)
        return cls

    def _register(self, cls):
        """Add a structure or collection class to the schema under its name."""
        if self._classes.get(cls._ps_type_id) is cls:
            return
        if hasattr(self, cls.__name__) and cls.__name__ != "Structure":
            raise SchemaError(f"{self._storage!r}: the schema already has a type named {cls.__name__!r}")
        self._user_types.append(cls)
        setattr(self, cls.__name__, cls)

    # -- the schema as data -----------------------------------------------------------------------
    def _create(self):
        """(New store) Number the types populateSchema defined and write the schema into the file."""
        for type_id, cls in enumerate(self._user_types, F.FIRST_USER_TYPE):
            cls._ps_type_id = type_id
            self._classes[type_id] = cls
        return self._write()

    def _write(self):
        """A new schema object holding ``_describe()`` (one reference: the schema slot's)."""
        text = json.dumps(self._describe(), separators=(",", ":")).encode()
        return new_string(self._storage._heap, F.T_SCHEMA, text, 1)

    def _store(self):
        """(Reopen, the schema changed) Put the new schema in the slot; the old one goes at the commit."""
        heap = self._storage._heap
        old = heap.pf.slots[F.SLOT_SCHEMA]
        heap.pf.slots[F.SLOT_SCHEMA] = self._write()
        self._schema_at = heap.pf.slots[F.SLOT_SCHEMA]
        heap.decref(old)

    def _describe(self):
        types = []
        for cls in self._user_types:
            if cls._ps_kind in C.KINDS:
                types.append({"id": cls._ps_type_id, "name": cls.__name__, "kind": cls._ps_kind,
                              "params": [_type_id_of(t) for t in cls._ps_params]})
                continue
            base = cls._ps_base
            entry = {"id": cls._ps_type_id, "name": cls.__name__, "kind": "structure",
                     "base": base._ps_type_id if base is not Structure else F.T_STRUCTURE,
                     "fields": [[name, _type_id_of(ftype)] for name, ftype in cls._ps_own_fields]}
            versions = cls.__dict__.get("_ps_versions")
            if versions:
                entry["versions"] = versions
            types.append(entry)
        return {"format": F.FORMAT_VERSION, "types": types}

    def _read(self):
        """The stored schema's types (checked that they are what a schema holds, not what they mean)."""
        heap = self._storage._heap
        name = heap.name
        offset = heap.pf.slots[F.SLOT_SCHEMA]
        heap.check_offset(offset, F.STRING.size)
        kind, _, _, length = heap.string_header(offset)
        if kind != F.T_SCHEMA:
            raise CorruptStorageError(f"{name}: no schema at {offset:#x}")
        heap.check_offset(offset, F.STRING.size + length)
        try:
            schema = json.loads(bytes(heap.mapping.view(offset + F.STRING.size, length)))
            types = schema["types"]
            ids = set()
            for entry in types:
                entry["id"], entry["name"] = int(entry["id"]), str(entry["name"])
                ids.add(entry["id"])
                if entry.get("kind") in C.KINDS:
                    entry["params"] = [int(type_id) for type_id in entry["params"]]
                    if len(entry["params"]) != C.DESCRIPTORS[entry["kind"]].arity:
                        raise ValueError(f"{entry['name']} has {len(entry['params'])} element types")
                    continue
                entry["base"], entry["fields"] = (
                    int(entry["base"]), [(str(field), int(type_id)) for field, type_id in entry["fields"]])
                if entry.get("kind") != "structure":
                    raise ValueError(f"unknown kind {entry.get('kind')!r}")
                versions = []
                for type_id, size, fields in entry.get("versions", ()):
                    type_id, size = int(type_id), int(size)
                    fields = [(str(field), int(field_type), int(at)) for field, field_type, at in fields]
                    if not FIRST <= type_id < F.MAX_TYPE_ID or type_id in ids or not 8 <= size <= MAX_SIZE \
                            or any(not field.isidentifier() or at < 8 or at % _ALIGN.get(field_type, 8)
                                   or at + _SIZE.get(field_type, 8) > size for field, field_type, at in fields):
                        raise ValueError(f"version {type_id} of {entry['name']} is inconsistent")
                    ids.add(type_id)
                    versions.append((type_id, size, fields))
                entry["versions"] = versions
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise CorruptStorageError(f"{name}: the stored schema is damaged "
                                      f"({type(exc).__name__}: {exc})") from None
        self._schema_at = offset
        self._stored_by_name = {entry["name"]: entry for entry in types}
        return types

    def _stored_field_type(self, type_id, where, later=None):
        """The type of stored type id ``type_id``; for a type of the file built later (``later``: id ->
        name), a placeholder resolved once every type is built."""
        if type_id in T.VALUE_TYPES_BY_ID:
            return T.VALUE_TYPES_BY_ID[type_id]
        if type_id in self._classes:
            return _current(self._classes[type_id])
        if later and type_id in later:
            placeholder = _Forward(later[type_id], where)
            placeholder.type_id = type_id
            self._forwards.append(placeholder)
            return placeholder
        raise CorruptStorageError(f"{self._storage._heap.name}: {where} refers to unknown type {type_id}")

    def _build(self, stored):
        """Build plain classes from the stored schema alone (bare ``Storage(path)``)."""
        classes = self._classes
        later = _later(stored)
        self._forwards = []
        built = self._build_types(stored, later)
        forwards, self._forwards = self._forwards, []
        self._apply({placeholder: _current(classes[placeholder.type_id]) for placeholder in forwards})
        self._add_versions(stored, built)

    def _build_types(self, stored, later, listed=True):
        """Build the classes of ``stored`` entries; ``listed=False``: not into the namespace (a reader's
        classes of newer versions of types it has).  Returns ``{id: class}``."""
        storage, classes = self._storage, self._classes
        name = storage._heap.name
        built = {}
        for entry in stored:
            if entry["id"] in classes or entry["id"] < F.FIRST_USER_TYPE \
                    or not entry["name"].isidentifier() or (listed and hasattr(self, entry["name"])):
                raise CorruptStorageError(f"{name}: stored type {entry['name']!r} is inconsistent")
            if entry["kind"] in C.KINDS:
                params = [self._stored_field_type(type_id, f"{entry['name']} element", later)
                          for type_id in entry["params"]]
                try:
                    cls = C.make_class(storage, entry["kind"], entry["name"], params)
                except SchemaError as exc:
                    raise CorruptStorageError(f"{name}: stored schema: {exc}") from None
                cls._ps_type_id = entry["id"]
                classes[entry["id"]] = built[entry["id"]] = cls
                self._user_types.append(cls)
                setattr(self, entry["name"], cls)
                continue
            base = Structure if entry["base"] == F.T_STRUCTURE else classes.get(entry["base"])
            if base is None or getattr(base, "_ps_kind", None) != "structure" or base.__dict__.get("_ps_old"):
                raise CorruptStorageError(f"{name}: stored type {entry['name']!r} is inconsistent")
            namespace = {"_ps_storage": storage, "__module__": "permastruct.schema", "_ps_unlisted": not listed}
            for field, type_id in entry["fields"]:
                if not field.isidentifier():
                    raise CorruptStorageError(f"{name}: stored field name {field!r} is invalid")
                namespace[field] = self._stored_field_type(type_id, f"{entry['name']}.{field}", later)
            try:
                cls = StructureMeta(entry["name"], (base,), namespace)
            except SchemaError as exc:
                raise CorruptStorageError(f"{name}: stored schema: {exc}") from None
            cls._ps_type_id = entry["id"]
            classes[entry["id"]] = built[entry["id"]] = cls
            if not listed:
                self._user_types.append(cls)  # (resolving placeholders reaches it)
        return built

    def _add_versions(self, stored, current):
        """The earlier versions of the structure types of ``stored``: their layouts, and the class of
        their objects (``current``: id -> the class of the current version)."""
        name = self._storage._heap.name
        todo = []
        for entry in stored:  # first every version's class (a layout may name any version's id)
            cls = current.get(entry["id"])
            if cls is None or cls._ps_kind != "structure":
                continue
            for type_id, size, fields in entry.get("versions", ()):
                if type_id in self._layouts:
                    continue
                if type_id in self._classes and self._classes[type_id]._ps_kind != "structure":
                    raise CorruptStorageError(f"{name}: version {type_id} of {entry['name']} is another type")
                if type_id not in self._classes:  # (a reader keeps its own class of its version)
                    self._classes[type_id] = old_version_class(cls, self._layouts)
                todo.append((entry["name"], type_id, size, fields))
        for type_name, type_id, size, fields in todo:
            self._layouts[type_id] = Layout(type_id, size, [
                (field, self._stored_field_type(field_type, f"{type_name}.{field}"), at)
                for field, field_type, at in fields])

    def _stored_order(self, name, own):
        """(Reopen) The fields ``own`` of class ``name`` in their stored order, new ones after them in
        the class's order: the layout stays the stored one, whatever order the class lists them in."""
        entry = self._stored_by_name.get(name)
        if not entry or entry.get("kind") != "structure":
            return own
        position = {field: index for index, (field, _) in enumerate(entry["fields"])}
        return sorted(own, key=lambda item: position.get(item[0], len(position)))

    def _bind(self, stored):
        """Bind the classes of populateSchema to the stored schema; return whether the schema grew.

        New types and new fields are added: a type whose layout changed (a
        field of its own or of a base was added) gets a new type id, and its
        previous layout is kept as a version, which its objects keep reading
        through.  Anything else that differs is a SchemaError.
        """
        storage = self._storage
        name = storage._heap.name
        stored_by_name = {entry["name"]: entry for entry in stored}
        by_id = {entry["id"]: entry for entry in stored}
        defined = {cls.__name__: cls for cls in self._user_types}
        missing = sorted(set(stored_by_name) - set(defined))
        if missing:
            raise SchemaError(f"{name}: schema mismatch: stored types not defined: {', '.join(missing)}")
        names_by_id = {entry["id"]: entry["name"] for entry in stored}
        for entry in stored:
            names_by_id.update((type_id, entry["name"]) for type_id, _, _ in entry.get("versions", ()))
        names_by_id.update({t.type_id: t.name for t in T.VALUE_TYPES})
        names_by_id.update({type_id: cls.__name__ for type_id, cls in PREDEFINED.items()})
        names_by_id[F.T_STRUCTURE] = "Structure"
        next_id = max(names_by_id, default=0) + 1
        next_id = max(next_id, F.FIRST_USER_TYPE)
        grown = []
        for cls in self._user_types:
            type_name = cls.__name__
            entry = stored_by_name.get(type_name)
            if entry is None:  # a new type
                cls._ps_type_id, next_id = next_id, next_id + 1
                grown.append(f"new type {type_name}")
                continue
            if cls._ps_kind in C.KINDS or entry["kind"] in C.KINDS:
                python_params = [type_label(t) for t in cls._ps_params] if cls._ps_kind in C.KINDS else None
                stored_params = [names_by_id.get(type_id, f"type {type_id}") for type_id in entry.get("params", ())]
                if cls._ps_kind != entry["kind"] or python_params != stored_params:
                    raise SchemaError(f"{name}: {type_name} is {_kind_text(cls._ps_kind, python_params)} "
                                      f"in Python but {_kind_text(entry['kind'], stored_params)} in the file")
                cls._ps_type_id = entry["id"]
                continue
            base = cls._ps_base
            if names_by_id.get(entry["base"]) != base.__name__:
                raise SchemaError(f"{name}: {type_name} derives from {base.__name__} in Python "
                                  f"but from {names_by_id.get(entry['base'])} in the file")
            python_fields = [(field, type_label(ftype)) for field, ftype in cls._ps_own_fields]
            stored_fields = [(field, names_by_id.get(type_id, f"type {type_id}"))
                             for field, type_id in entry["fields"]]
            if python_fields[:len(stored_fields)] != stored_fields:
                raise SchemaError(f"{name}: {_difference(type_name, python_fields, stored_fields)}")
            layout, size = _stored_layout(entry, by_id)
            versions = [list(version) for version in entry["versions"]]
            full = [(field, type_label(ftype)) for field, ftype in cls._ps_field_types.items()]
            if full == [(field, names_by_id.get(type_id)) for field, type_id, _ in layout]:
                cls._ps_type_id = entry["id"]
            else:  # its layout changed: a new id; the objects written so far keep the old one
                versions.append([entry["id"], size, [list(field) for field in layout]])
                cls._ps_type_id, next_id = next_id, next_id + 1
                added = [field for field, _ in python_fields[len(stored_fields):]]
                grown.append(f"{type_name}: new fields {', '.join(added)}" if added
                             else f"{type_name}: its base grew")
            cls._ps_versions = versions
        if grown and storage.readonly:
            raise SchemaError(f"{name} is open read-only, and its stored schema lacks what the classes "
                              f"define ({'; '.join(grown)}): open it writable once to add it")
        for cls in self._user_types:
            self._classes[cls._ps_type_id] = cls
        structures = [cls for cls in self._user_types if cls._ps_kind == "structure"]
        self._add_versions([{"id": cls._ps_type_id, "name": cls.__name__, "versions": cls._ps_versions}
                            for cls in structures if cls.__dict__.get("_ps_versions")],
                           {cls._ps_type_id: cls for cls in structures})
        return bool(grown)

    def _still(self, proxy, type_id):
        """(A reader's refresh) Whether ``proxy`` still shows the object at its offset, whose type id
        is now ``type_id``.  A proxy of an earlier version reads the header on every access: it
        stays right while the object is a version of its type or a FORWARD; a proxy of an object
        that the writer has since moved (a FORWARD now) becomes such a proxy."""
        cls = type(proxy)
        if type_id == cls._ps_type_id and not cls.__dict__.get("_ps_old"):
            return True
        if cls._ps_kind != "structure":
            return False
        if type_id == F.T_FORWARD or type_id in self._layouts:
            if not cls.__dict__.get("_ps_old"):
                newest = self._classes.get(self._stored_by_name.get(cls.__name__, {}).get("id"))
                if newest is None or newest._ps_kind != "structure":
                    return False
                object.__setattr__(proxy, "__class__", old_version_class(_current(newest), self._layouts))
            return True
        return False

    def _refresh(self):
        """(A reader moved to a newer commit) Learn the types and versions the writer added since."""
        heap = self._storage._heap
        if heap.pf.slots[F.SLOT_SCHEMA] == self._schema_at:
            return
        stored = self._read()
        fresh = [entry for entry in stored if entry["id"] not in self._classes]
        later = _later(fresh)
        self._forwards = []
        new_names = [entry for entry in fresh if not hasattr(self, entry["name"])]
        newer = [entry for entry in fresh if hasattr(self, entry["name"])]
        built = self._build_types(new_names, later)
        built.update(self._build_types(newer, later, listed=False))
        forwards, self._forwards = self._forwards, []
        self._apply({placeholder: _current(self._classes[placeholder.type_id]) for placeholder in forwards})
        current = {entry["id"]: _current(self._classes[entry["id"]]) for entry in stored
                   if entry["id"] in self._classes}
        self._add_versions(stored, current)
        if self._storage.readonly:
            for cls in built.values():
                cls._ps_readonly = True


class _Forward:
    """A type named in quotes (``next = "Node"``) until ``populateSchema`` returns and it is resolved."""

    _ps_type_id = 0
    _ps_kind = None

    def __init__(self, type_name, where):
        self.__name__ = type_name
        self.where = where

    def __repr__(self):
        return repr(self.__name__)


def _not_a_type(value):
    """Why class attribute ``value`` cannot be a field although it looks like a type (None: it is not
    meant as one - a method, a property, a constant, a nested helper class)."""
    problem = not_a_type(value)
    if problem is not None or not isinstance(value, type) or not issubclass(value, T.Persistent):
        return problem
    return "use a type defined in this storage's populateSchema (self.define(...) returns it)"


def _annotation(template, text):
    """The value of annotation ``text`` (``from __future__ import annotations``) of a field of
    module-level class ``template``: evaluated in its module; a name it cannot find stays a name."""
    return evaluate_annotation(template.__module__, text, vars(template))


FIRST = F.FIRST_USER_TYPE
MAX_SIZE = 1 << 24  # no structure version is larger (a damaged schema cannot claim more)
_SIZE = {t.type_id: ctypes.sizeof(t.ctype) for t in T.VALUE_TYPES}  # by-reference: 8
_ALIGN = {t.type_id: ctypes.alignment(t.ctype) for t in T.VALUE_TYPES}


def _current(cls):
    """The class of the current version of ``cls``'s type (``cls`` may be an earlier version's)."""
    return cls.__bases__[0] if cls.__dict__.get("_ps_old") else cls


def _later(stored):
    """``{id: name}`` of the stored types (what a placeholder may stand for while they are built)."""
    return {entry["id"]: entry["name"] for entry in stored}


def _stored_layout(entry, by_id):
    """``([(field, type id, offset)], size)``: the whole layout of stored structure type ``entry`` as
    the file has it (base fields first), worked out like :class:`StructureMeta` lays out classes."""
    chain = []
    while True:
        chain.append(entry)
        if entry["base"] == F.T_STRUCTURE:
            break
        entry = by_id.get(entry["base"])
        if entry is None or entry.get("kind") != "structure" or len(chain) > len(by_id):
            raise CorruptStorageError(f"the stored base of {chain[0]['name']} is inconsistent")
    level = type("Header", (ctypes.LittleEndianStructure,), {"_fields_": [("_t", ctypes.c_uint32),
                                                                        ("_r", ctypes.c_uint32)]})
    fields = []
    for entry in reversed(chain):
        cfields = [(field, T.VALUE_TYPES_BY_ID[type_id].ctype if type_id in T.VALUE_TYPES_BY_ID
                    else ctypes.c_uint64) for field, type_id in entry["fields"]]
        level = type(entry["name"], (level,), {"_fields_": cfields})
        fields += [(field, type_id, getattr(level, field).offset) for field, type_id in entry["fields"]]
    return fields, -(-ctypes.sizeof(level) // 8) * 8


def _difference(type_name, python_fields, stored_fields):
    """What differs between the stored fields of a type and its class, beyond added fields."""
    python = dict(python_fields)
    for field, stored in stored_fields:
        if field not in python:
            added = [f for f, _ in python_fields if f not in dict(stored_fields)]
            return (f"{type_name}.{field} ({stored}) is in the file but not in the class"
                    + (f" (which adds {', '.join(added)})" if added else "")
                    + ": removing or renaming a field is an explicit change: "
                    f"Storage.drop_field(path, {type_name!r}, {field!r}) or "
                    f"Storage.rename_field(path, {type_name!r}, {field!r}, new_name) first; {_EXPLICIT}")
        if python[field] != stored:
            numbers = {t.name: t for t in T.VALUE_TYPES}
            if stored in numbers and python[field] in numbers and _widens(numbers[stored], numbers[python[field]]):
                how = (f"Storage.change_field_type(path, {type_name!r}, {field!r}, {python[field]}) first")
            else:
                how = (f"a {stored} field cannot become a {python[field]} one (only a number type that holds "
                       f"every value of the old one); Storage.drop_field(path, {type_name!r}, {field!r}) "
                       "and a new field instead")
            return (f"{type_name}.{field} is {python[field]} in the class but {stored} in the file: "
                    f"changing a field's type is an explicit change: {how}; {_EXPLICIT}")
    return f"fields of {type_name} differ"


_EXPLICIT = "see docs/schema.rst"  # (completed by _difference with the call to make)


def type_label(ftype):
    """The name of a field type: ``Int``, ``ByteString``, ``Agent``."""
    return ftype.name if isinstance(ftype, T.ValueType) else ftype.__name__


def _type_id_of(ftype):
    return ftype.type_id if isinstance(ftype, T.ValueType) else ftype._ps_type_id


def _kind_text(kind, params):
    if kind not in C.KINDS:
        return "a structure"
    return f"a {kind} of ({', '.join(params or ())})"


def _fields_text(fields):
    return "(" + ", ".join(f"{name}: {type_name}" for name, type_name in fields) + ")" if fields else "no fields"


# -- explicit changes ----------------------------------------------------------------------------------
#
# Removing, renaming or retyping a field is never done by a reopen: it is one of the calls below
# (``Storage.rename_field``, ``Storage.drop_field``, ``Storage.change_field_type``), each of which
# opens the store with the bare Storage, changes the stored schema and commits, in one commit.
# No object is rewritten: a renamed field keeps its bytes (the layouts are renamed); a dropped or
# retyped field makes the type (and its subclasses) a new version, and objects written before are
# read through their stored layout, as after an added field.

def explicit_change(storage, call, type_name, field, change):
    """Apply ``change(entry, stored, by_id)`` to stored structure type ``type_name`` of the bare,
    writable ``storage`` (whose field ``field`` it is about) and commit; ``call`` names the call in
    errors.  The storage is closed afterwards; on an error the file is left as it was."""
    try:
        stored = storage.schema._read()
        by_id = {entry["id"]: entry for entry in stored}
        entry = next((e for e in stored if e["name"] == type_name), None)
        if entry is None or entry["kind"] != "structure":
            known = ", ".join(e["name"] for e in stored if e["kind"] == "structure") or "none"
            raise SchemaError(f"{call}: {storage._heap.name} has no structure type {type_name!r} "
                              f"(its structure types: {known})")
        own = [name for name, _ in entry["fields"]]
        if field not in own:
            owner = _ancestor_with(entry, by_id, field)
            where = f"it is a field of {owner['name']}: name that type" if owner else \
                f"its fields: {', '.join(own) or 'none'}"
            raise SchemaError(f"{call}: {type_name} has no field {field!r} of its own ({where})")
        change(entry, stored, by_id)
        heap = storage._heap
        text = json.dumps({"format": F.FORMAT_VERSION, "types": stored}, separators=(",", ":")).encode()
        old = heap.pf.slots[F.SLOT_SCHEMA]
        heap.pf.slots[F.SLOT_SCHEMA] = new_string(heap, F.T_SCHEMA, text, 1)
        heap.decref(old)
        storage.commit()
    except BaseException:
        if not storage.closed:
            storage.rollback()
        raise
    finally:
        storage.close()


def _ancestor_with(entry, by_id, field):
    while entry["base"] != F.T_STRUCTURE:
        entry = by_id[entry["base"]]
        if field in [name for name, _ in entry["fields"]]:
            return entry
    return None


def _family(entry, stored):
    """``entry`` and every stored type derived from it, bases before subclasses."""
    family, ids = [entry], {entry["id"]}
    for other in stored:
        if other.get("kind") == "structure" and other["base"] in ids and other["id"] not in ids:
            family.append(other)
            ids.add(other["id"])
    return family


def _taken(entry, stored, by_id, name):
    """Whether field name ``name`` is used by ``entry``, a base of it or a type derived from it."""
    chain = [entry]
    while chain[-1]["base"] != F.T_STRUCTURE:
        chain.append(by_id[chain[-1]["base"]])
    return any(name in [field for field, _ in other["fields"]] for other in chain + _family(entry, stored))


def new_versions(entry, stored, by_id, edit):
    """Give ``entry`` and the types derived from it a new layout: each gets a new type id, its
    current layout becomes a version; ``edit(entry)`` changes ``entry``'s own fields.  Every
    stored reference to the old ids (bases, field types, element types) follows."""
    family = _family(entry, stored)
    layouts = {member["id"]: _stored_layout(member, by_id) for member in family}
    next_id = max([e["id"] for e in stored] + [v[0] for e in stored for v in e.get("versions", ())]
                  + [F.FIRST_USER_TYPE - 1]) + 1
    renumber = {}
    edit(entry)
    for member in family:
        fields, size = layouts[member["id"]]
        member["versions"] = list(member.get("versions", ())) + [[member["id"], size, [list(f) for f in fields]]]
        renumber[member["id"]] = next_id
        member["id"], next_id = next_id, next_id + 1
    for other in stored:
        if other.get("kind") == "structure":
            other["base"] = renumber.get(other["base"], other["base"])
            other["fields"] = [[name, renumber.get(type_id, type_id)] for name, type_id in other["fields"]]
        else:
            other["params"] = [renumber.get(type_id, type_id) for type_id in other["params"]]


def _retire(family, field):
    """Rename field ``field`` in the stored versions of ``family`` to a name no class can use (it was
    dropped: a later field of that name must not read its bytes)."""
    taken = {name for member in family for _, _, fields in member.get("versions", ()) for name, _, _ in fields}
    hidden = next(f"_ps_dropped_{field}_{n}" for n in range(len(taken) + 1)
                  if f"_ps_dropped_{field}_{n}" not in taken)
    for member in family:
        member["versions"] = [[type_id, size, [[hidden if name == field else name, ftype, at]
                                               for name, ftype, at in fields]]
                              for type_id, size, fields in member.get("versions", ())]


def rename_field(storage, type_name, old, new):
    call = f"rename_field({type_name!r}, {old!r}, {new!r})"

    def change(entry, stored, by_id):
        if not isinstance(new, str) or not new.isidentifier() or new.startswith("_") or new in _RESERVED:
            raise SchemaError(f"{call}: {new!r} cannot be a field name (an identifier, not starting with '_')")
        if _taken(entry, stored, by_id, new):
            raise SchemaError(f"{call}: {type_name}, a base or a subclass of it already has a field {new!r}")
        entry["fields"] = [[new if name == old else name, type_id] for name, type_id in entry["fields"]]
        _retire(_family(entry, stored), new)  # (a field of that name dropped before keeps its bytes apart)
        for member in _family(entry, stored):  # the same bytes under the new name, in every version
            member["versions"] = [[type_id, size, [[new if name == old else name, ftype, at]
                                                   for name, ftype, at in fields]]
                                  for type_id, size, fields in member.get("versions", ())]
    explicit_change(storage, call, type_name, old, change)


def drop_field(storage, type_name, field):
    call = f"drop_field({type_name!r}, {field!r})"

    def change(entry, stored, by_id):
        new_versions(entry, stored, by_id, lambda e: e.__setitem__(
            "fields", [[name, type_id] for name, type_id in e["fields"] if name != field]))
        _retire(_family(entry, stored), field)
    explicit_change(storage, call, type_name, field, change)


def change_field_type(storage, type_name, field, new_type):
    call = f"change_field_type({type_name!r}, {field!r}, {getattr(new_type, 'name', new_type)!r})"

    def change(entry, stored, by_id):
        old_type = T.VALUE_TYPES_BY_ID.get(dict(entry["fields"])[field])
        if not isinstance(new_type, T.ValueType) or old_type is None:
            raise SchemaError(f"{call}: only a number field changes type, to another number type "
                              f"(Int8 .. UInt64, Float32, Float64)")
        if not _widens(old_type, new_type):
            raise SchemaError(f"{call}: {type_name}.{field} is {old_type.name}, and not every {old_type.name} "
                              f"value is a {new_type.name}: only a change to a type that holds every value "
                              "the field may hold is possible (no object is read to check)")
        if old_type is new_type:
            return
        new_versions(entry, stored, by_id, lambda e: e.__setitem__(
            "fields", [[name, new_type.type_id if name == field else type_id] for name, type_id in e["fields"]]))
    explicit_change(storage, call, type_name, field, change)


_RESERVED = frozenset({"isSameAs"})


def _widens(old, new):
    """Whether number type ``new`` holds every value of number type ``old``."""
    if old.kind == "bool" or new.kind == "bool":
        return old.kind == new.kind
    if new.kind == "float":
        if old.kind == "float":
            return new.pack is None or old.pack is not None  # Float32 into Float64, not back
        return (old.high - old.low).bit_length() <= (24 if new.pack is not None else 53)
    return old.kind == "int" and new.low <= old.low and old.high <= new.high
