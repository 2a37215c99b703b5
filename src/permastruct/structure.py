"""Schema-defined structures: ``Structure`` and its metaclass ``StructureMeta``.

A structure class lists its fields as class attributes whose values are
types.  :class:`StructureMeta` turns them, once, at class creation, into a
``ctypes`` layout (by-value fields are C-level ``ctypes`` fields, read without
Python code), a property per by-reference field, and one ``__setattr__`` that
checks every write before it reaches the map.  It also writes the fields and
their types into the class docstring, and gives the class a signature
(``Agent(*, name: ByteString = None, age: Int = 0)``), so that
``help(p.schema.Agent)`` shows them.

Structure classes are created inside ``Storage.populateSchema`` and belong to
that storage; calling one creates a persistent object in it::

    class Agent(self.schema.Structure):
        name = self.schema.ByteString
        age = self.schema.Int

    agent = p.schema.Agent(name=b"Felix", age=31)
"""

import ctypes
import math
import struct
import threading

from . import _format as F
from ._types import Persistent, PersistentMeta, ValueType, change, run_change
from .errors import ReadOnlyError, SchemaError
from .strings import new_string

__all__ = ["Structure", "StructureMeta"]

_local = threading.local()

#: What ctypes offers on structure classes (``from_address`` makes every proxy): not field names.
_CLASS_API = frozenset(name for name in dir(type(ctypes.Structure)) if not name.startswith("__"))

_KIND_NAMES = {"list": "List", "dict": "Dict", "set": "Set", "sorteddict": "SortedDict"}


def _type_label(ftype):
    """How field type ``ftype`` reads in documentation: ``Int``, ``Agent``, ``Agents (List[Agent])``."""
    if isinstance(ftype, ValueType):
        return ftype.name
    name = getattr(ftype, "__name__", repr(ftype))
    kind = _KIND_NAMES.get(getattr(ftype, "_ps_kind", None))
    if kind is None:
        return name
    params = ", ".join(p.name if isinstance(p, ValueType) else p.__name__ for p in ftype._ps_params)
    return f"{name} ({kind}[{params}])"


def _cleandoc(doc):
    """``inspect.cleandoc`` (without importing inspect): the first line stripped, the rest dedented."""
    lines = doc.expandtabs().split("\n")
    rest = [line for line in lines[1:] if line.strip()]
    margin = min((len(line) - len(line.lstrip()) for line in rest), default=0)
    lines = [lines[0].strip()] + [line[margin:].rstrip() for line in lines[1:]]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


def _class_doc(name, doc, fields, base):
    """The docstring of structure class ``name``: the user's ``doc`` (or a line) and its fields with types."""
    origin = {}
    for klass in reversed(base.__mro__):
        for field, _ in vars(klass).get("_ps_own_fields", ()):
            origin[field] = klass.__name__
    lines = []
    for field, ftype in fields.items():
        where = f" (from {origin[field]})" if field in origin else ""
        lines.append(f"    {field}: {_type_label(ftype)}{where}")
    text = _cleandoc(doc) if isinstance(doc, str) and doc.strip() else f"A persistent {name} structure."
    return text + "\n\nFields:\n" + ("\n".join(lines) if lines else "    (none)")


class _Label(str):
    """A type name shown as itself in a signature (``name: ByteString``, not ``name: 'ByteString'``)."""

    __slots__ = ()

    def __repr__(self):
        return str(self)


def populating():
    """The storage whose ``populateSchema`` is running in this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def push_populating(storage):
    _local.__dict__.setdefault("stack", []).append(storage)


def pop_populating():
    _local.stack.pop()


class StructureMeta(PersistentMeta):
    """Metaclass of persistent structures: computes the layout and accessors once per class."""

    def __new__(mcls, name, bases, namespace, **kwargs):
        if namespace.get("_ps_template") or namespace.get("_ps_closed"):  # Structure itself, dead variants
            return super().__new__(mcls, name, bases, namespace)
        from_file = "_ps_storage" in namespace  # built from a stored schema: every name is a field
        storage = namespace.pop("_ps_storage", None) or populating()
        if storage is None:
            raise SchemaError(f"structure {name!r} must be defined inside a Storage's populateSchema()")
        struct_bases = [b for b in bases if isinstance(b, StructureMeta)]
        if len(struct_bases) != 1:
            raise SchemaError(f"structure {name!r} must derive from exactly one structure class")
        base = struct_bases[0]
        if base._storage is not None and base._storage is not storage:
            raise SchemaError(f"structure {name!r} derives from {base.__name__!r} of another storage")
        own = []
        for attr, value in list(namespace.items()):
            if from_file and attr.startswith("__") and attr != "__module__":
                raise SchemaError(f"{name}.{attr}: names starting with '__' cannot be fields")
            ftype = None if attr.startswith("__") else storage.schema._class_field_type(name, attr, value)
            if ftype is not None:
                if attr.startswith("_ps_"):
                    raise SchemaError(f"{name}.{attr}: field names starting with '_ps_' are reserved")
                if attr in base._ps_field_types:
                    raise SchemaError(f"{name}.{attr}: field already defined in {base.__name__}")
                if attr in _CLASS_API or any(attr in vars(klass) for klass in base.__mro__):
                    # _fields_, from_buffer, isSameAs, a method of the base...: a field would hide it
                    raise SchemaError(f"{name}.{attr}: the name is taken by {base.__name__} "
                                      "(an attribute or method of the class)")
                own.append((attr, ftype))
                del namespace[attr]
        cfields = []
        for attr, ftype in own:
            if isinstance(ftype, ValueType):
                cfields.append((attr, ftype.ctype))
            else:
                cfields.append(("_ps_ref_" + attr, ctypes.c_uint64))
        namespace["_fields_"] = cfields
        namespace.setdefault("__slots__", ())
        namespace["_storage"] = storage
        namespace["_heap"] = storage._heap
        namespace["_ps_own_fields"] = tuple(own)
        namespace["_ps_field_types"] = dict(base._ps_field_types, **dict(own))
        namespace["_ps_kind"] = "structure"
        namespace["_ps_user_doc"] = namespace.get("__doc__")
        namespace["__doc__"] = _class_doc(name, namespace.get("__doc__"), namespace["_ps_field_types"], base)
        for attr, ftype in own:
            if not isinstance(ftype, ValueType):
                namespace[attr] = _ref_property(attr, "_ps_ref_" + attr, ftype)
        try:
            cls = super().__new__(mcls, name, bases, namespace)
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. a bad __slots__ or layout
            raise SchemaError(f"structure {name!r} cannot be built: {exc}") from None
        cls._ps_size = -(-ctypes.sizeof(cls) // 8) * 8
        _make_accessors(cls)
        cls._ps_ref_at = tuple(getattr(cls, "_ps_ref_" + name).offset for name, ftype in
                               cls._ps_field_types.items() if not isinstance(ftype, ValueType))
        cls._ps_type_id = 0
        storage.schema._register(cls)
        return cls

    def _ps_resolve(cls, resolved):
        """Put the types that names in quotes stand for (``next = "Node"``) into this class's fields.

        ``resolved`` maps each placeholder to its type.  The layout does not
        change (a reference is 8 bytes whatever it names); the setters, the
        constructor and the docstring, which know the field types, are made
        again.
        """
        cls._ps_own_fields = tuple((attr, resolved.get(ftype, ftype)) for attr, ftype in cls._ps_own_fields)
        cls._ps_field_types = {attr: resolved.get(ftype, ftype) for attr, ftype in cls._ps_field_types.items()}
        for attr, ftype in cls._ps_own_fields:
            if not isinstance(ftype, ValueType):
                setattr(cls, attr, _ref_property(attr, "_ps_ref_" + attr, ftype))
        cls.__doc__ = _class_doc(cls.__name__, cls._ps_user_doc, cls._ps_field_types, cls.__bases__[0])
        _make_accessors(cls)

    def __call__(cls, *args, **fields):
        """Create a persistent object of this structure in its storage."""
        if args:
            raise TypeError(f"{cls.__name__}() takes field values as keyword arguments only")
        heap = cls._heap
        if heap is None:
            raise TypeError("Structure is abstract: define a subclass in populateSchema()")
        return run_change(heap, cls._ps_new, fields)

    @property
    def __signature__(cls):
        """The signature of creating one: the fields as keyword-only parameters with their defaults.

        >>> import inspect
        >>> from permastruct import Storage
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         class Agent(self.schema.Structure):
        ...             name = self.schema.ByteString
        ...             age = self.schema.Int
        >>> p = S(None)
        >>> inspect.signature(p.schema.Agent)
        <Signature (*, name: ByteString = None, age: Int = 0)>
        >>> print(p.schema.Agent.__doc__)
        A persistent Agent structure.
        <BLANKLINE>
        Fields:
            name: ByteString
            age: Int
        """
        import inspect

        defaults = {"int": 0, "float": 0.0, "bool": False}
        return inspect.Signature([
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_Label(_type_label(ftype)),
                              default=defaults[ftype.kind] if isinstance(ftype, ValueType) else None)
            for name, ftype in cls._ps_field_types.items()])


def _make_accessors(cls):
    """The write functions, ``__setattr__`` and constructor of structure class ``cls`` (once its field
    types are known)."""
    storage = cls._storage
    cls._ps_setters = _make_setters(cls, storage._heap)
    cls.__setattr__ = _make_setattr(cls, storage.readonly)
    cls._ps_new = _make_constructor(cls)


def _ref_property(name, hidden, ftype):
    """The property of by-reference field ``name`` (stored in ctypes field ``hidden``).

    Reading returns the proxy or None.  Assignments go through the class's
    ``__setattr__`` (which checks and counts references) before they can
    reach the property; its setter forwards there too, for whoever calls
    it directly.
    """
    def get(self, _hidden=hidden):
        offset = getattr(self, _hidden)
        if not offset:
            return None
        return type(self)._heap.proxy(offset)

    def set(self, value):
        type(self).__setattr__(self, name, value)
    get.__name__ = set.__name__ = name
    return property(get, set, doc=f"{name}: {_type_label(ftype)} (by reference; None until set)")


def _make_setters(cls, heap):
    """The per-field write functions of ``cls``: ``setter(proxy, value)``."""
    setters = {}
    owner = cls.__name__
    for name, ftype in cls._ps_field_types.items():
        if isinstance(ftype, ValueType):
            cfield = getattr(cls, name)
            if ftype.kind == "float" and ftype.pack is None:
                check = ftype.checker(name, owner)

                def set_float(proxy, value, _set=cfield.__set__, _check=check):
                    if type(value) is float:
                        _set(proxy, value)
                    else:
                        _set(proxy, _check(value))
                setters[name] = set_float
            else:
                def set_value(proxy, value, _set=cfield.__set__, _check=ftype.checker(name, owner)):
                    _set(proxy, _check(value))
                setters[name] = set_value
        else:
            setters[name] = _ref_setter(cls, name, ftype, heap)
    return setters


def _ref_setter(cls, name, ftype, heap):
    """The write function of by-reference field ``cls.name`` (reference counts included): one change."""
    hidden = getattr(cls, "_ps_ref_" + name)
    get, put = hidden.__get__, hidden.__set__
    where = f"{cls.__name__}.{name}"
    reference_to, incref, decref = heap.reference_to, heap.incref, heap.decref
    # A plain str (String) or bytes (ByteString) becomes a new string object
    # that starts with its one reference: the common case, without a detour.
    exact = _exact_string(ftype)
    type_id = ftype._ps_type_id

    def set_reference(proxy, value):
        if type(value) is exact:
            new = new_string(heap, type_id, value if exact is bytes else value.encode("utf-8"), 1)
        else:
            new = reference_to(ftype, value, where)
            if new:
                incref(new)
        old = get(proxy)
        put(proxy, new)
        if old:
            decref(old)
    return change(set_reference)


def _exact_string(ftype):
    """``str`` for a String field type, ``bytes`` for a ByteString one, else None."""
    if getattr(ftype, "_ps_kind", None) != "string":
        return None
    return str if ftype._ps_type_id == F.T_STRING else bytes if ftype._ps_type_id == F.T_BYTESTRING else None


def _make_constructor(cls):
    """``new(fields)``: a new object of structure ``cls`` from keyword values, made once per class.

    Every value is checked before anything is made; then the objects the
    reference fields need (strings are born with their one reference), then
    the object itself, written in one ``pack_into`` of a format worked out
    here from the ctypes layout (header, fields, padding).
    """
    heap = cls._heap
    names = list(cls._ps_field_types)
    codes, at = ["<II"], 8
    for name in sorted(names, key=lambda n: getattr(cls, n if isinstance(cls._ps_field_types[n], ValueType)
                                                    else "_ps_ref_" + n).offset):
        ftype = cls._ps_field_types[name]
        cfield = getattr(cls, name if isinstance(ftype, ValueType) else "_ps_ref_" + name)
        if cfield.offset > at:
            codes.append(f"{cfield.offset - at}x")
        if isinstance(ftype, ValueType):
            codes.append("?" if ftype.kind == "bool" else ftype.code)
        else:
            codes.append("Q")
        at = cfield.offset + cfield.size
    if cls._ps_size > at:
        codes.append(f"{cls._ps_size - at}x")
    order = sorted(names, key=lambda n: getattr(cls, n if isinstance(cls._ps_field_types[n], ValueType)
                                                else "_ps_ref_" + n).offset)
    packer = struct.Struct("".join(codes))
    assert packer.size == cls._ps_size, (packer.size, cls._ps_size)
    index = {name: position for position, name in enumerate(order)}
    fields = [cls._ps_field_types[name] for name in order]
    owner = cls.__name__
    defaults = [(False if f.kind == "bool" else 0.0 if f.kind == "float" else 0) if isinstance(f, ValueType) else 0
                for f in fields]
    checks = [f.checker(name, owner) if isinstance(f, ValueType) else None for name, f in zip(order, fields)]
    fast = [(int if f.kind == "int" else float if f.kind == "float" and f.pack is None else None, f.low, f.high)
            if isinstance(f, ValueType) else None for f in fields]
    exact_strings = [_exact_string(f) if not isinstance(f, ValueType) else None for f in fields]
    wheres = [f"{owner}.{name}" for name in order]
    float32 = struct.Struct("<f")

    def new(given):
        if not heap.writable:
            heap.check_writable()
        values = list(defaults)
        references = []  # (position, value) of reference fields, checked below, made after
        for name, value in given.items():
            position = index.get(name)
            if position is None:
                unknown = [n for n in given if n not in index]
                raise TypeError(f"{owner}() got unexpected field(s) {', '.join(map(repr, unknown))}; "
                                f"fields are: {', '.join(names) or 'none'}")
            check = checks[position]
            if check is None:
                if value is not None:
                    if type(value) is not exact_strings[position]:
                        heap.reference_check_value(fields[position], value, wheres[position])
                    references.append((position, value))
                continue
            exact, low, high = fast[position]
            if type(value) is not exact or (exact is int and not low <= value <= high):
                value = check(value)
                if fields[position].pack is not None:  # Float32: kept in single precision
                    value = float32.unpack(float32.pack(value))[0]
            values[position] = value
        made = []
        try:
            for position, value in references:
                exact = exact_strings[position]
                if type(value) is exact:
                    offset = new_string(heap, fields[position]._ps_type_id,
                                        value if exact is bytes else value.encode("utf-8"), 1)
                else:
                    offset = heap.reference_to(fields[position], value, wheres[position])
                    heap.incref(offset)
                made.append(offset)
                values[position] = offset
            offset, view, local, base = heap.allocator.place(packer.size)
        except BaseException:
            for target in made:  # nothing refers to them after all: freed at the next commit
                heap.decref(target)
            raise
        packer.pack_into(view, local, cls._ps_type_id, 0, *values)
        heap.created.add(offset)
        heap.unreferenced.add(offset)
        return heap.remember(offset, cls.from_address(base + local))
    return new


def _make_setattr(cls, readonly):
    """The ``__setattr__`` of structure class ``cls``.

    An exact ``int`` in range (or a ``float`` for a double) goes straight to
    the ctypes field's setter (C code); every other value goes through the
    field's checker first: ctypes wraps an integer that does not fit without
    a word, so it must only see values that fit.
    """
    setters = cls._ps_setters
    fields = cls._ps_field_types
    fast = {}  # name -> (ctypes field setter, exact type, low, high)
    for name, ftype in fields.items():
        if isinstance(ftype, ValueType) and ftype.code and ftype.pack is None:
            exact = int if ftype.kind == "int" else float
            low, high = (ftype.low, ftype.high) if ftype.kind == "int" else (-math.inf, math.inf)
            fast[name] = (getattr(cls, name).__set__, exact, low, high)
    owner = cls.__name__
    fallback = object.__setattr__

    def other(self, name, value):
        if name.startswith("_ps_") or not hasattr(type(self), name):
            raise AttributeError(f"{owner!r} has no field {name!r} (fields: "
                                 f"{', '.join(fields) or 'none'})") from None
        fallback(self, name, value)

    def __delattr__(self, name):
        if name in fields:
            raise AttributeError(f"cannot delete field {name!r} of {owner}: a field always exists; "
                                 "set it to None (a reference) or to a value")
        raise AttributeError(f"{owner!r} has no field {name!r} (fields: {', '.join(fields) or 'none'})")
    cls.__delattr__ = __delattr__

    if readonly:
        def __setattr__(self, name, value):
            if name in fields:
                raise ReadOnlyError(f"{type(self)._storage!r} is open read-only: cannot set {owner}.{name}")
            other(self, name, value)
        return __setattr__

    def __setattr__(self, name, value):
        entry = fast.get(name)
        if entry is not None and type(value) is entry[1] and entry[2] <= value <= entry[3]:
            entry[0](self, value)
            return
        setter = setters.get(name)
        if setter is None:
            return other(self, name, value)
        setter(self, value)
    return __setattr__


class Structure(Persistent, metaclass=StructureMeta):
    """Base class of persistent structures (see the module documentation)."""

    _ps_template = True
    __slots__ = ()
    _ps_field_types = {}
    _ps_own_fields = ()
    _ps_kind = "structure"
    _ps_type_id = F.T_STRUCTURE

    def __eq__(self, other):
        if not isinstance(other, Structure):
            return NotImplemented
        if self.isSameAs(other):
            return True
        if type(other)._ps_field_types != type(self)._ps_field_types:
            return False
        return all(getattr(self, name) == getattr(other, name) for name in type(self)._ps_field_types)

    __hash__ = None

    _ps_ref_at = ()  # the offsets of the reference fields in the object (made per class)

    def _ps_fields(self):
        """``{field: value}`` of this object (by-reference fields as proxies)."""
        return {name: getattr(self, name) for name in type(self)._ps_field_types}

    @classmethod
    def _ps_references(cls, heap, offset, type_id):
        refs = cls._ps_ref_at
        if not refs:
            return []
        segment, local = heap.locate(offset, cls._ps_size)
        return [target for target in (F.UINT64.unpack_from(segment.map, local + at)[0] for at in refs) if target]


del Structure._ps_template
