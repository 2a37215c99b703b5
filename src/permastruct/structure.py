"""Schema-defined structures: ``Structure`` and its metaclass ``StructureMeta``.

A structure class lists its fields as class attributes whose values are
types.  :class:`StructureMeta` turns them, once, at class creation, into a
``ctypes`` layout (by-value fields are C-level ``ctypes`` fields, read without
Python code), a property per by-reference field, and one ``__setattr__`` that
checks every write before it reaches the map.  It also writes the fields and
their types into the class docstring, and gives the class a signature
(``Agent(*, name: ByteString = None, age: Int = 0)``), so that
``help(p.schema.Agent)`` shows them.

Making an object is the hot path of loading data, so each class also gets a
constructor generated for it when its first object is made
(:func:`_make_constructor`): its fields are the keyword parameters, and it is
the ``__call__`` of a metaclass of the class's own (``AgentType``), so
``Agent(...)`` is one Python call.

Structure classes are created inside ``Storage.populateSchema`` and belong to
that storage; calling one creates a persistent object in it::

    class Agent(self.schema.Structure):
        name = self.schema.ByteString
        age = self.schema.Int

    agent = p.schema.Agent(name=b"Felix", age=31)
"""

import ctypes
import functools
import keyword
import math
import struct
import sys
import threading
import zlib
from array import array
from collections import abc
from operator import itemgetter

from . import _format as F
from ._types import _CUT_SHORT, Persistent, PersistentMeta, ValueType, _concurrent, _get_ident, change, run_change
from .errors import CorruptStorageError, ReadOnlyError, SchemaError
from .strings import MAX_BYTES, TextEncodeError, new_string, new_strings, storable

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
        if namespace.get("_ps_template") or namespace.get("_ps_closed") or namespace.get("_ps_old"):
            # Structure itself, dead variants, the classes of earlier versions
            return super().__new__(mcls, name, bases, namespace)
        from_file = "_ps_storage" in namespace  # built from a stored schema: every name is a field
        unlisted = namespace.pop("_ps_unlisted", False)  # (a reader's class of a newer version)
        binding = namespace.pop("_ps_binding", False)  # (Schema._bind_template: a module-level class)
        storage = namespace.pop("_ps_storage", None) or populating()
        if storage is None:  # a module-level class: fields declared, bound by self.define(cls)
            return mcls._module_level(mcls, name, bases, namespace)
        templates = [b for b in bases if isinstance(b, StructureMeta) and b.__dict__.get("_ps_module_level")]
        if templates and not binding:  # a storage's class derived from a module-level one: from its bound class
            bases = tuple(storage.schema._bind_template(b) if b in templates else b for b in bases)
            templates = []
        struct_bases = [b for b in bases if isinstance(b, StructureMeta) and b not in templates]
        if not struct_bases and templates:
            struct_bases = [Structure]
        if len(struct_bases) != 1:
            raise SchemaError(f"structure {name!r} must derive from exactly one structure class")
        base = struct_bases[0]
        if base._storage is not None and base._storage is not storage:
            raise SchemaError(f"structure {name!r} derives from {base.__name__!r} of another storage")
        own = []
        for attr, value in _declarations(namespace):
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
                namespace.pop(attr, None)
        if not from_file:  # on reopen, the stored order first (reordering the class is no change)
            own = storage.schema._stored_order(name, own)
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
        namespace["_ps_base"] = base  # its structure base (a module-level class it binds is not one)
        namespace["_ps_user_doc"] = namespace.get("__doc__")
        namespace["__doc__"] = _class_doc(name, namespace.get("__doc__"), namespace["_ps_field_types"], base)
        for attr, ftype in own:
            if not isinstance(ftype, ValueType):
                namespace[attr] = _ref_property(attr, "_ps_ref_" + attr, ftype)
        # Each class gets a metaclass of its own, whose ``__call__`` becomes the constructor generated
        # for it (_make_accessors): making an object is then one Python call.
        for klass in bases:  # derived from the metaclass of its base (StructureMeta(...) names the root one)
            if issubclass(type(klass), mcls):
                mcls = type(klass)
        meta = type(f"{name}Type", (mcls,), {"__module__": mcls.__module__, "__qualname__": f"{name}Type"})
        try:
            cls = super().__new__(meta, name, bases, namespace)
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. a bad __slots__ or layout
            raise SchemaError(f"structure {name!r} cannot be built: {exc}") from None
        meta._ps_class_of = cls
        cls._ps_size = -(-ctypes.sizeof(cls) // 8) * 8
        _make_accessors(cls)
        cls._ps_ref_at = tuple(getattr(cls, "_ps_ref_" + name).offset for name, ftype in
                               cls._ps_field_types.items() if not isinstance(ftype, ValueType))
        cls._ps_type_id = 0
        if not unlisted:
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
        cls.__doc__ = _class_doc(cls.__name__, cls._ps_user_doc, cls._ps_field_types, cls._ps_base)
        _make_accessors(cls)

    def _module_level(mcls, name, bases, namespace):
        """A structure class declared outside any ``populateSchema``: its fields are recorded
        (``_ps_declared``), not laid out; ``self.define(cls)`` makes a storage's class of it."""
        parents = [b for b in bases if isinstance(b, StructureMeta)]
        if len(parents) != 1 or not (parents[0] is Structure or parents[0].__dict__.get("_ps_module_level")):
            raise SchemaError(f"module-level structure {name!r} must derive from Structure or from another "
                              "module-level structure class (a storage's own classes are made inside its "
                              "populateSchema)")
        declared = []
        annotations = namespace.get("__annotations__", {})
        for attr, value in _declarations(namespace, evaluate=False):
            if attr.startswith("__"):
                continue
            problem = not_a_type(value)
            if problem is not None:
                raise SchemaError(f"{name}.{attr} = {shown(value)} is not a field type: {problem}")
            if _declares_field(value):
                if attr.startswith("_ps_"):
                    raise SchemaError(f"{name}.{attr}: field names starting with '_ps_' are reserved")
                declared.append((attr, value, attr in annotations and attr not in namespace))
                namespace.pop(attr, None)
        namespace["_ps_declared"] = tuple(declared)
        namespace["_ps_module_level"] = True
        namespace.setdefault("__slots__", ())
        return super().__new__(mcls, name, bases, namespace)

    def __call__(cls, *args, **fields):
        """Create a persistent object of this structure in its storage."""
        if args:
            raise TypeError(f"{cls.__name__}() takes field values as keyword arguments only")
        heap = cls._heap
        if heap is None:
            if cls.__dict__.get("_ps_module_level"):
                raise TypeError(f"{cls.__name__} is a module-level structure class: bind it to a storage with "
                                f"self.define({cls.__name__}) in its populateSchema, then make objects with "
                                f"p.schema.{cls.__name__}(...)")
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


def _declarations(namespace, evaluate=True):
    """``[(name, value)]`` of a class body: its attributes, and the names it only annotates
    (``age: Int``) with their annotations (a string annotation - ``from __future__ import
    annotations`` - evaluated in the class's module unless ``evaluate`` is false)."""
    items = list(namespace.items())
    annotations = namespace.get("__annotations__", {})
    if isinstance(annotations, dict):
        module = namespace.get("__module__")
        items = [(attr, evaluate_annotation(module, value, namespace) if evaluate else value)
                 for attr, value in annotations.items() if attr not in namespace and not _class_var(value)] + items
    return items


def evaluate_annotation(module, text, namespace=None):
    """The value of string annotation ``text`` in ``module`` (a name it cannot find stays the string:
    a type of the schema named in quotes)."""
    if not isinstance(text, str):
        return text
    try:
        return eval(text, dict(vars(sys.modules[module])) if module in sys.modules else {}, dict(namespace or {}))
    except Exception:
        return text


def _class_var(value):
    text = value if isinstance(value, str) else repr(value)
    return "ClassVar" in text


def _declares_field(value):
    """Whether class attribute ``value`` of a module-level structure class declares a field."""
    from .collections import _Descriptor
    return isinstance(value, (ValueType, str, _Descriptor)) or (
        isinstance(value, type) and issubclass(value, Persistent) and value is not Structure)


#: What to write instead of a Python type used as a field type.
_INSTEAD = {str: "String", bytes: "ByteString", int: "Int", float: "Float", bool: "Bool",
            bytearray: "Buffer", memoryview: "Buffer", list: "a List('Name')[T]",
            dict: "a Dict('Name')[K, V]", set: "a Set('Name')[T]", frozenset: "a Set('Name')[T]"}


def not_a_type(value):
    """Why class attribute ``value`` cannot be a field although it looks like a type (None: it is not
    meant as one - a method, a property, a constant, a nested helper class)."""
    if isinstance(value, type):
        if value in _INSTEAD:
            return f"write {_INSTEAD[value]} (self.schema.{_INSTEAD[value]})" if " " not in _INSTEAD[value] \
                else f"use {_INSTEAD[value]} (from permastruct)"
        if value.__module__ == "builtins":
            return "a builtin Python type is not a persistent type"
        if issubclass(value, Persistent):
            if value is Structure:
                return "name a structure class of this schema (Structure itself is only a base class)"
            return None
        if value.__module__ in ("ctypes", "_ctypes") or issubclass(value, (ctypes._SimpleCData, ctypes.Structure)):
            return "use the permastruct number types (Int32, UInt8, Float...), not ctypes types"
        return None
    if type(value).__module__ in ("typing", "types") and hasattr(value, "__origin__"):
        return "a type hint is not a persistent type; use the permastruct types"
    return None


def shown(value):
    return value.__qualname__ if isinstance(value, type) else repr(value)


def _make_accessors(cls):
    """The write functions, ``__setattr__`` and constructor of structure class ``cls`` (once its field
    types are known)."""
    storage = cls._storage
    cls._ps_setters = _make_setters(cls, storage._heap)
    cls.__setattr__ = _make_setattr(cls, storage.readonly)
    cls._ps_new = _general_constructor(cls, *_constructor_layout(cls))
    meta = type(cls)
    if meta.__dict__.get("_ps_class_of") is cls:  # its own metaclass: calls of the class go to ``call``
        meta.__call__ = _first_call(cls)


def _first_call(cls):
    """The ``__call__`` of ``cls``'s own metaclass until its first object is made.

    It generates the class's constructor (:func:`_make_constructor`), puts it
    in its own place and makes the object with it: compiling one costs about
    0.3 ms, which an open that makes no object of the class never pays (an
    open builds every class of the schema).
    """
    def first(klass, *args, **fields):
        if klass is not cls:  # a subclass without a constructor of its own, a dead variant
            return StructureMeta.__call__(klass, *args, **fields)
        call = _make_constructor(cls) or StructureMeta.__call__
        type(cls).__call__ = call
        return call(klass, *args, **fields)
    return first


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
            try:
                data = value if exact is bytes else value.encode("utf-8")
            except UnicodeEncodeError:
                data = None
            if data is None or len(data) > MAX_BYTES:  # a lone surrogate, over 4 GiB: the error that says where
                storable(type_id, value, where)
            new = new_string(heap, type_id, data, 1)
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


def _constructor_layout(cls):
    """``(order, packer)``: the fields of ``cls`` in file order and the ``Struct`` that writes a
    whole object of it (header, fields, padding), worked out once from the ctypes layout."""
    types = cls._ps_field_types

    def cfield(name):
        return getattr(cls, name if isinstance(types[name], ValueType) else "_ps_ref_" + name)
    order = sorted(types, key=lambda name: cfield(name).offset)
    codes, at = ["<II"], 8
    for name in order:
        ftype, field = types[name], cfield(name)
        if field.offset > at:
            codes.append(f"{field.offset - at}x")
        codes.append(("?" if ftype.kind == "bool" else ftype.code) if isinstance(ftype, ValueType) else "Q")
        at = field.offset + field.size
    if cls._ps_size > at:
        codes.append(f"{cls._ps_size - at}x")
    packer = struct.Struct("".join(codes))
    assert packer.size == cls._ps_size, (packer.size, cls._ps_size)
    return order, packer


def _make_constructor(cls):
    """``call(cls, **fields)``: the constructor of structure ``cls``, generated for it (None when
    its field names cannot be parameters).

    It does what ``cls._ps_new(given)`` (:func:`_general_constructor`, the
    path of :meth:`StructureMeta.__call__`) does, written out for this class
    as the ``__call__`` of its own metaclass, so
    that ``Agent(name=..., age=...)`` runs it directly: its fields are its
    keyword parameters (the interpreter binds them, with their defaults), the
    change guard is inline, and each value is checked inline (the common type
    first, the field's checker for everything else).  Every value is checked
    before anything is made; then the objects the reference fields need
    (strings are born with their one reference), then the object itself,
    written in one ``pack_into``, and its proxy.  The generated code names
    nothing but its parameters and ``_ps_`` names (which no field may have),
    so a field called ``type`` or ``int`` is just a field; field names that
    cannot be parameters (keywords, from a stored schema) have none.
    """
    heap = cls._heap
    order, packer = _constructor_layout(cls)
    types = cls._ps_field_types
    owner = cls.__name__
    if not all(name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_ps_")
               for name in order):
        return None
    env = {"_ps_heap": heap, "_ps_pack": packer.pack_into, "_ps_from_address": cls.from_address,
           "_ps_new_string": new_string, "_ps_cls": cls, "_ps_type": type, "_ps_int": int,
           "_ps_float": float, "_ps_bool": bool, "_ps_bytes": bytes, "_ps_str": str,
           "_ps_BaseException": BaseException, "_ps_Exception": Exception, "_ps_isinstance": isinstance,
           "_ps_CUT_SHORT": _CUT_SHORT, "_ps_ident": _get_ident, "_ps_concurrent": _concurrent,
           "_ps_other": _other_call, "__builtins__": {}}
    params, checks, makes, undo = [], [], [], []
    # One string field made from bytes or str takes its slot beside the record's (place_pair): the
    # string is written here, born with its one reference.
    strings = [name for name in order if not isinstance(types[name], ValueType) and _exact_string(types[name])]
    paired = strings[0] if len(strings) == 1 else None
    for name in types:  # parameters in declaration order, as the signature shows them
        ftype = types[name]
        params.append(f"{name}={_DEFAULTS[ftype.kind]!r}" if isinstance(ftype, ValueType) else f"{name}=None")
    for name in order:
        ftype = types[name]
        if isinstance(ftype, ValueType):
            env[f"_ps_check_{name}"] = ftype.checker(name, owner)
            if ftype.kind == "int":
                checks.append(f"if _ps_type({name}) is not _ps_int or not {ftype.low} <= {name} <= {ftype.high}:\n"
                              f"    {name} = _ps_check_{name}({name})")
            elif ftype.kind == "float" and ftype.pack is None:
                checks.append(f"if _ps_type({name}) is not _ps_float:\n    {name} = _ps_check_{name}({name})")
            elif ftype.kind == "bool":
                checks.append(f"if _ps_type({name}) is not _ps_bool:\n    {name} = _ps_check_{name}({name})")
            else:  # Float32: any number it takes, rounded by the packer
                checks.append(f"{name} = _ps_check_{name}({name})")
            continue
        env[f"_ps_type_{name}"] = ftype
        exact = _exact_string(ftype)
        where = f"{owner}.{name}"
        by_reference = (f"    _ps_made = _ps_heap.reference_to(_ps_type_{name}, {name}, {where!r})\n"
                        f"    _ps_heap.incref(_ps_made)\n"
                        f"    {name} = _ps_made")
        if exact is None:
            checks.append(f"if {name} is not None:\n"
                          f"    _ps_heap.reference_check_value(_ps_type_{name}, {name}, {where!r})")
            makes.append(f"if {name} is None:\n    {name} = 0\nelse:\n{by_reference}")
        else:
            checks.append(f"if {name} is not None and _ps_type({name}) is not _ps_{exact.__name__}:\n"
                          f"    _ps_heap.reference_check_value(_ps_type_{name}, {name}, {where!r})")
            type_id = ftype._ps_type_id
            # the bytes to store: a lone surrogate or a string over MAX_BYTES raises the error that
            # names the field (storable())
            env.update(_ps_len=len, _ps_MAX=MAX_BYTES, _ps_storable=storable,
                       _ps_UnicodeEncodeError=UnicodeEncodeError)
            encode = (f"    _ps_data = {name}\n" if exact is bytes else
                      f"    try:\n        _ps_data = {name}.encode('utf-8')\n"
                      f"    except _ps_UnicodeEncodeError:\n        _ps_data = None\n")
            refuse = (f"    _ps_n = -1 if _ps_data is None else _ps_len(_ps_data)\n"
                      f"    if _ps_n < 0 or _ps_n > _ps_MAX:\n"
                      f"        _ps_storable({type_id}, {name}, {where!r})\n")
            if name == paired:
                seed = F.STRING_SEED if type_id == F.T_STRING else F.BYTES_SEED
                env.update(_ps_pack_string=F.STRING.pack_into, _ps_crc32=zlib.crc32)
                makes.append(f"if {name} is None:\n    {name} = 0\n"
                             f"elif _ps_type({name}) is _ps_{exact.__name__}:\n" + encode + refuse +
                             f"    if _ps_n <= {min(1024, MAX_BYTES)}:\n"
                             f"        _ps_string, _ps_sview, _ps_slocal, _ps_offset, _ps_view, _ps_local, _ps_base = "
                             f"_ps_heap.allocator.place_pair({F.STRING.size} + _ps_n, {packer.size})\n"
                             f"        _ps_pack_string(_ps_sview, _ps_slocal, {type_id}, 1, _ps_crc32(_ps_data, {seed}), _ps_n)\n"
                             f"        _ps_sview[_ps_slocal + {F.STRING.size}:_ps_slocal + {F.STRING.size} + _ps_n] = _ps_data\n"
                             f"        _ps_heap.created.add(_ps_string)\n"
                             f"        {name} = _ps_string\n"
                             f"    else:\n"
                             f"        {name} = _ps_new_string(_ps_heap, {type_id}, _ps_data, 1)\n"
                             f"else:\n{by_reference}")
                undo.append(name)
                continue
            makes.append(f"if {name} is None:\n    {name} = 0\n"
                         f"elif _ps_type({name}) is _ps_{exact.__name__}:\n" + encode + refuse +
                         f"    {name} = _ps_new_string(_ps_heap, {type_id}, _ps_data, 1)\n"
                         f"else:\n{by_reference}")
        undo.append(name)
    place = f"_ps_offset, _ps_view, _ps_local, _ps_base = _ps_heap.allocator.place({packer.size})"
    body = ["if not _ps_heap.writable:", "    _ps_heap.check_writable()"] + checks
    if paired is not None:  # its make comes last and may place the record too
        makes.append(makes.pop(undo.index(paired)))
        undo.append(undo.pop(undo.index(paired)))
        place = f"if not _ps_offset:\n    {place}"
        body.append("_ps_offset = 0")
    if makes:
        env["_ps_undo"] = functools.partial(_undo_made, heap)
        body += ["try:"] + [_indent(make) for make in makes] + [_indent(place),
                 "except _ps_BaseException:", f"    _ps_undo({', '.join(undo)})", "    raise"]
    else:
        body.append(place)
    body += [f"_ps_pack(_ps_view, _ps_local, _ps_cls._ps_type_id, 0{''.join(', ' + name for name in order)})",
             "_ps_heap.created.add(_ps_offset)",
             "_ps_heap.unreferenced.add(_ps_offset)",
             "_ps_proxy = _ps_heap.remember(_ps_offset, _ps_from_address(_ps_base + _ps_local))"]
    given = "".join(f", {name}={name}" for name in types)
    lines = [f"def call(_ps_class, *_ps_args{''.join(', ' + p for p in params) if params else ''}, **_ps_unknown):",
             "    if _ps_args or _ps_unknown or _ps_class is not _ps_cls:  # a subclass's or a mistake",
             f"        return _ps_other(_ps_class, _ps_args, _ps_unknown{given})",
             "    _ps_outer = not _ps_heap._changing  # the change guard (_types.run_change), inline",
             "    if _ps_outer:",
             "        _ps_heap._changing = _ps_ident()",
             "    elif _ps_heap._changing != _ps_ident():",
             "        raise _ps_concurrent(_ps_heap)",
             "    try:"] + [_indent(line, 8) for line in body] + [
             "    except _ps_Exception as _ps_error:",
             "        if _ps_outer and not _ps_isinstance(_ps_error, _ps_CUT_SHORT):",
             "            _ps_heap._changing = 0",
             "        raise",
             "    if _ps_outer:",
             "        _ps_heap._changing = 0",
             "    return _ps_proxy"]
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<constructor of {owner}>", "exec"), env)
    call = env["call"]
    call.__qualname__ = f"{owner}.__call__"
    call._ps_source = source  # for whoever wonders what runs
    return call


def _indent(text, by=4):
    return "\n".join(" " * by + line for line in text.split("\n"))


def _other_call(_ps_class, _ps_args, _ps_unknown, /, **fields):
    """A generated ``call`` that is not for this exact class (a subclass without one of its own, a dead
    variant) or not well formed: the general path, which says what is wrong."""
    fields.update(_ps_unknown)
    return StructureMeta.__call__(_ps_class, *_ps_args, **fields)


def _unexpected_fields(owner, names, unknown):
    raise TypeError(f"{owner}() got unexpected field(s) {', '.join(map(repr, unknown))}; "
                    f"fields are: {', '.join(names) or 'none'}")


def _undo_made(heap, *values):
    """Drop the references a constructor cut short had taken (the reference fields already made are
    offsets; the others still hold what was given): freed at the next commit."""
    for value in values:
        if type(value) is int and value:
            heap.decref(value)


def _general_constructor(cls, order, packer):
    """``new(given)``: an object of ``cls`` from the dict of its field values (see :func:`_make_constructor`)."""
    heap = cls._heap
    index = {name: position for position, name in enumerate(order)}
    fields = [cls._ps_field_types[name] for name in order]
    owner = cls.__name__
    defaults = [_DEFAULTS[f.kind] if isinstance(f, ValueType) else 0 for f in fields]
    checks = [f.checker(name, owner) if isinstance(f, ValueType) else None for name, f in zip(order, fields)]
    wheres = [f"{owner}.{name}" for name in order]

    def new(given):
        if not heap.writable:
            heap.check_writable()
        values = list(defaults)
        references = []  # (position, value) of reference fields, checked below, made after
        for name, value in given.items():
            position = index.get(name)
            if position is None:
                _unexpected_fields(owner, list(cls._ps_field_types), [n for n in given if n not in index])
            check = checks[position]
            if check is None:
                if value is not None:
                    heap.reference_check_value(fields[position], value, wheres[position])
                    references.append((position, value))
                continue
            values[position] = check(value)
        made = []
        try:
            for position, value in references:
                exact = _exact_string(fields[position])
                if type(value) is exact:
                    offset = new_string(heap, fields[position]._ps_type_id,
                                        storable(fields[position]._ps_type_id, value, wheres[position]), 1)
                else:
                    offset = heap.reference_to(fields[position], value, wheres[position])
                    heap.incref(offset)
                made.append(offset)
                values[position] = offset
            offset, view, local, base = heap.allocator.place(packer.size)
        except BaseException:
            _undo_made(heap, *made)
            raise
        packer.pack_into(view, local, cls._ps_type_id, 0, *values)
        heap.created.add(offset)
        heap.unreferenced.add(offset)
        return heap.remember(offset, cls.from_address(base + local))
    return new


# -- many records at once ------------------------------------------------------------------
_DEFAULTS = {"int": 0, "float": 0.0, "bool": False}  # what a field left out holds (a reference: None)
_SIGNED, _UNSIGNED, _FLOATS = frozenset("bhilqn"), frozenset("BHILQN"), frozenset("fd")


def _format_kind(code):
    code = code.lstrip("@=<>!")
    return "int" if code in _SIGNED else "uint" if code in _UNSIGNED else "float" if code in _FLOATS \
        else "bool" if code == "?" else None


def record_columns(cls, rows, columns):
    """``({field: values}, count)`` of new records of ``cls`` from ``rows`` or ``columns``.

    A row is a mapping of field names to values, or a sequence of every
    field's value in the order of ``cls``'s fields (its signature's order).
    Columns map field names to sequences of one length.  Fields not given
    take their defaults.  Only the shape is checked here; the values are
    checked by :func:`make_records`.
    """
    names = list(cls._ps_field_types)
    owner = cls.__name__
    if (rows is None) == (columns is None):
        raise TypeError(f"give rows or columns of {owner} records (one of them)")
    if columns is not None:
        if not isinstance(columns, abc.Mapping):
            raise TypeError(f"columns must be a mapping of {owner} field names to sequences, "
                            f"not {type(columns).__name__}")
        unknown = [name for name in columns if name not in cls._ps_field_types]
        if unknown:
            raise TypeError(f"{owner} has no field(s) {', '.join(map(repr, unknown))}; fields are: "
                            f"{', '.join(names) or 'none'}")
        columns = {name: values if isinstance(values, (abc.Sequence, memoryview)) or hasattr(values, "__array__")
                   else list(values) for name, values in columns.items()}
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the columns of {owner} records differ in length: "
                             + ", ".join(f"{name} has {length}" for name, length in lengths.items()))
        return columns, next(iter(lengths.values()), 0)
    rows = rows if isinstance(rows, list) else list(rows)
    if not rows:
        return {}, 0
    kinds = set(map(type, rows))  # checked once per type of row, not once per row
    mappings = [kind for kind in kinds if issubclass(kind, abc.Mapping)]
    if mappings:
        given = set().union(*(row for row in rows if type(row) in mappings))
        unknown = sorted(map(repr, given.difference(names)))
        if unknown:
            raise TypeError(f"{owner} has no field(s) {', '.join(unknown)}; fields are: {', '.join(names) or 'none'}")
        defaults = {name: _DEFAULTS.get(getattr(ftype, "kind", None)) for name, ftype in cls._ps_field_types.items()}
        if len(mappings) == len(kinds):
            return {name: [row.get(name, defaults[name]) for row in rows] for name in names if name in given}, \
                len(rows)
        rows = [tuple(row.get(name, defaults[name]) for name in names) if type(row) in mappings else row
                for row in rows]  # mappings among sequences: as sequences
        kinds = set(map(type, rows))
    for kind in kinds:
        if issubclass(kind, (str, bytes, abc.Mapping)) or not issubclass(kind, abc.Sequence):
            position = next(i for i, row in enumerate(rows) if type(row) is kind)
            raise TypeError(f"{owner} row {position} is a {kind.__name__}: a row is a sequence of "
                            f"the field values ({', '.join(names)}) or a mapping of field names to values")
    lengths = set(map(len, rows))
    if lengths != {len(names)}:
        position = next(i for i, row in enumerate(rows) if len(row) != len(names))
        raise TypeError(f"{owner} row {position} has {len(rows[position])} values for {len(names)} fields "
                        f"({', '.join(names)})")
    return {name: list(map(itemgetter(k), rows)) for k, name in enumerate(names)}, len(rows)


def _value_column(ftype, code, values, name, owner):
    """``values`` as a buffer of ``struct`` format ``code``, checked as single writes check them."""
    try:
        given = memoryview(values)
    except TypeError:
        given = None
    if given is not None and given.ndim == 1 and given.c_contiguous and given.itemsize == struct.calcsize(code) \
            and ftype.pack is None and _format_kind(given.format) == ftype.kind.replace("int", "uint" if
                                                                                      ftype.low == 0 else "int"):
        return given.cast("B").cast(code)  # already of the stored type (a numpy array, an array): as it is
    check = ftype.checker(name, owner)
    try:
        if ftype.kind == "bool":
            return memoryview(bytes(map(check, values)))
        if ftype.pack is None:
            return memoryview(array(code, values))  # C-level checks, the same as a single write's
        return memoryview(array(code, map(check, values)))  # Float32: each value must fit
    except (TypeError, OverflowError, ValueError):
        pass  # find the bad value below, for the error a single write gives
    for position, value in enumerate(values):
        try:
            check(value)
        except (TypeError, OverflowError) as exc:
            raise type(exc)(f"row {position}: {exc}") from None
    return memoryview(array(code, map(check, values)))


def make_records(cls, columns, count, references):
    """``array('Q')`` of the offsets of ``count`` new objects of structure ``cls`` (one change).

    ``columns`` (from :func:`record_columns`) gives field values; each
    object is born with ``references`` references.  Every value is checked
    before anything is made; then the strings and other objects the
    reference fields need, then the records, placed side by side and
    written a slab page at a time with one strided slice assignment per
    field.  A store that runs out of room makes nothing.
    """
    heap = cls._heap
    if not heap.writable:
        heap.check_writable()
    owner = cls.__name__
    layout = []  # (byte offset in the object, struct code, values)
    strings = []  # (offset, string type id, encoded values) of string columns
    others = []  # (offset, field type, values, where) of other reference columns
    for name, values in columns.items():
        ftype = cls._ps_field_types[name]
        where = f"{owner}.{name}"
        if isinstance(ftype, ValueType):
            code = "B" if ftype.kind == "bool" else ftype.code
            layout.append((getattr(cls, name).offset, code, _value_column(ftype, code, values, name, owner)))
            continue
        at = getattr(cls, "_ps_ref_" + name).offset
        exact = _exact_string(ftype)
        kinds = set(map(type, values))
        if exact is not None and kinds <= {exact, type(None)}:
            try:
                datas = values if exact is bytes else [None if value is None else value.encode("utf-8")
                                                        for value in values]
            except UnicodeEncodeError:  # (a lone surrogate: the error that names the field and the row)
                for position, value in enumerate(values):
                    if value is not None:
                        storable(ftype._ps_type_id, value, f"row {position}: {where}")
                raise
            strings.append((at, ftype._ps_type_id, datas, where))
            continue
        for position, value in enumerate(values):
            try:
                heap.reference_check_value(ftype, value, where)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"row {position}: {exc}") from None
        others.append((at, ftype, values, where))
    made = []  # arrays of the offsets of objects made for reference fields (each holds one reference)
    try:
        for at, type_id, datas, where in strings:
            try:
                made.append(new_strings(heap, type_id, datas, 1))
            except OverflowError as exc:  # (one over 4 GiB: none of them was made)
                raise OverflowError(f"{where} is {'String' if type_id == F.T_STRING else 'ByteString'}: "
                                    f"{exc}") from None
            layout.append((at, "Q", memoryview(made[-1])))
        for at, ftype, values, where in others:
            targets = array("Q", bytes(8 * count))
            made.append(targets)
            for position, value in enumerate(values):
                try:
                    target = heap.reference_to(ftype, value, where)
                except (TypeError, ValueError, OverflowError) as exc:  # found only while making it
                    raise _in_row(exc, position) from None
                if target:
                    heap.incref(target)
                    targets[position] = target
            layout.append((at, "Q", memoryview(targets)))
        placement = heap.allocator.place_many(cls._ps_size, count)
    except Exception:
        for targets in made:
            for target in targets:
                if target:
                    heap.decref(target)
        raise
    placement.write(F.OBJECT_HEADER.pack(cls._ps_type_id, references), layout)
    offsets = placement.offsets()
    heap.created_many.append(offsets)
    if not references:
        heap.unreferenced.update(offsets)
    return offsets


def _in_row(exc, position):
    """An exception of the class of ``exc`` whose message starts with the row it is about."""
    if isinstance(exc, UnicodeEncodeError):  # (its class takes five arguments)
        return TextEncodeError(exc.encoding, exc.object, exc.start, exc.end, f"row {position}: {exc}")
    return type(exc)(f"row {position}: {exc}")


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


# -- objects written before the type changed -------------------------------------------------------
#
# An object keeps the type id of the layout it was written with.  Each earlier
# layout (a *version*, kept in the stored schema) gets the type's *old-version
# class*: a subclass of the current class (so ``isinstance`` holds) whose proxy
# covers only the object's header, and whose fields are Python properties that
# read the header on every access: an object of an earlier version is read
# through its stored layout (a field added since reads as its default); a
# FORWARD is read through its body.  The first write to such an object
# *upgrades* it: its values move to a new body of the current version and the
# object becomes a FORWARD to it (its place, and so every reference to it, stays).
# Objects of the current version never meet any of this: their class is the one
# ``populateSchema`` made, with its ctypes fields.

class Layout:
    """One stored version of a structure type: its type id, size and ``{field: (type, offset)}``."""

    __slots__ = ("type_id", "size", "fields")

    def __init__(self, type_id, size, fields):
        self.type_id, self.size = type_id, size
        self.fields = {name: (ftype, offset) for name, ftype, offset in fields}

    def references(self):
        """``[(field, type, offset)]`` of the by-reference fields."""
        return [(name, ftype, offset) for name, (ftype, offset) in self.fields.items()
                if not isinstance(ftype, ValueType)]


def layout_of(cls):
    """The :class:`Layout` of current structure class ``cls``."""
    fields = []
    for name, ftype in cls._ps_field_types.items():
        cfield = getattr(cls, name if isinstance(ftype, ValueType) else "_ps_ref_" + name)
        fields.append((name, ftype, cfield.offset))
    return Layout(cls._ps_type_id, cls._ps_size, fields)


_U32, _U64 = ctypes.c_uint32.from_address, ctypes.c_uint64.from_address


def old_version_class(cls, layouts):
    """The class of ``cls``'s objects of earlier versions and FORWARDs (made once per class).

    ``layouts`` maps the type ids of the earlier versions to their
    :class:`Layout` (the schema's, shared: a reader's refresh adds to it).
    """
    made = cls.__dict__.get("_ps_old_class")
    if made is not None:
        return made
    heap = cls._heap
    owner = cls.__name__
    fields = cls._ps_field_types

    def body_of(proxy, address):
        """A proxy (not remembered) of the body of the FORWARD at ``address``."""
        return body_proxy(heap, _U64(address + 8).value)

    def reader(name, ftype):
        if isinstance(ftype, ValueType):
            default = False if ftype.kind == "bool" else 0.0 if ftype.kind == "float" else 0
        else:
            default = None

        def get(self):
            address = ctypes.addressof(self)
            type_id = _U32(address).value
            if type_id == F.T_FORWARD:
                return getattr(body_of(self, address), name)
            layout = layouts.get(type_id)
            if layout is None:
                raise CorruptStorageError(f"{heap.name}: the {owner} at {self._ps_oid:#x} has type id "
                                          f"{type_id}, which is no version of {owner}")
            entry = layout.fields.get(name)
            if entry is None:
                return default  # added since this object was written
            stored, offset = entry
            if isinstance(stored, ValueType):
                return stored.ctype.from_address(address + offset).value
            return heap.proxy(_U64(address + offset).value)

        def set(self, value):
            type(self).__setattr__(self, name, value)
        get.__name__ = set.__name__ = name
        return property(get, set, doc=f"{name}: {_type_label(ftype)}")

    checks = {}
    for name, ftype in fields.items():
        if isinstance(ftype, ValueType):
            checks[name] = ftype.checker(name, owner)
        else:
            checks[name] = functools.partial(heap.reference_check_value, ftype, where=f"{owner}.{name}")

    @change
    def write(self, name, value):
        checks[name](value)  # a wrong value is refused before the object is upgraded
        setattr(upgrade(heap, self._ps_oid, cls, layouts), name, value)

    def __setattr__(self, name, value):
        if name not in fields:
            if name.startswith("_ps_") or not hasattr(type(self), name):
                raise AttributeError(f"{owner!r} has no field {name!r} (fields: {', '.join(fields) or 'none'})")
            return object.__setattr__(self, name, value)
        if cls._storage.readonly:
            raise ReadOnlyError(f"{cls._storage!r} is open read-only: cannot set {owner}.{name}")
        write(self, name, value)

    def references(klass, heap, offset, type_id):
        segment, local = heap.locate(offset, 8)
        type_id = F.UINT32.unpack_from(segment.map, local)[0]
        layout = layouts[type_id]
        segment, local = heap.locate(offset, layout.size)
        return [target for target in (F.UINT64.unpack_from(segment.map, local + at)[0]
                                      for _, _, at in layout.references()) if target]

    def validate(proxy, room):
        """(Making a proxy) The object's stored layout must fit where it is: every read through it
        then stays in the map."""
        type_id = _U32(ctypes.addressof(proxy)).value
        size = F.FORWARD.size if type_id == F.T_FORWARD else getattr(layouts.get(type_id), "size", None)
        if size is None:
            return f"its type id {type_id} is no version of {owner}"
        if size > room:
            return f"its {size} bytes cross the end of the map"
        return None

    namespace = {"__slots__": (), "_ps_old": True, "__setattr__": __setattr__, "__module__": cls.__module__,
                 "_ps_references": classmethod(references), "__doc__": cls.__doc__, "_ps_validate": validate}
    for name, ftype in fields.items():
        namespace[name] = reader(name, ftype)
    old = StructureMeta(owner, (cls,), namespace)
    old.__qualname__ = cls.__qualname__
    old._ps_extent = 8  # the header: what every version and a FORWARD have
    cls._ps_old_class = old
    return old


def upgrade(heap, offset, cls, layouts):
    """Move the object at ``offset`` (an earlier version of ``cls``, or a FORWARD) to a body of the
    current version, if it is not there yet; return a proxy (not remembered) of that body.

    The values move as they are (references keep their counts: the body holds
    them now), each field read through its stored layout and written as the
    current type; the object becomes a FORWARD to the body, which has one
    reference, the FORWARD's.  Inside a change (the caller's).
    """
    segment, local = heap.locate(offset, F.FORWARD.size)
    type_id, refs, body = F.FORWARD.unpack_from(segment.map, local)
    old_body = None
    if type_id == F.T_FORWARD:
        if F.UINT32.unpack_from(heap.mapping.view(body, 4))[0] == cls._ps_type_id:
            return body_proxy(heap, body)
        old_body, source, source_type = body, body, F.UINT32.unpack_from(heap.mapping.view(body, 4))[0]
    else:
        source, source_type = offset, type_id
    layout = layouts[source_type]
    src_segment, src_local = heap.locate(source, layout.size)
    address = src_segment.address + src_local
    values, dropped = {}, []
    for name, (stored, at) in layout.fields.items():
        if name not in cls._ps_field_types:  # a field dropped since: what it referenced loses a reference
            if not isinstance(stored, ValueType) and _U64(address + at).value:
                dropped.append(_U64(address + at).value)
            continue
        if isinstance(stored, ValueType):
            values[name] = stored.ctype.from_address(address + at).value
        else:
            values[name] = _U64(address + at).value
    new = heap.new_object(cls, cls._ps_size)
    target = body_proxy(heap, new)
    for name, value in values.items():
        ftype = cls._ps_field_types[name]
        if isinstance(ftype, ValueType):
            getattr(cls, name).__set__(target, ftype.checker(name, cls.__name__)(value))
        else:
            getattr(cls, "_ps_ref_" + name).__set__(target, value)
    heap.incref(new)  # the FORWARD's reference
    heap.unreferenced.discard(new)
    F.FORWARD.pack_into(heap.mapping.view(offset, F.FORWARD.size), 0, F.T_FORWARD, refs, new)
    if old_body is not None:  # its references moved: its space goes, not what it referenced
        heap.created.discard(old_body)
        heap.allocator.free(old_body)
    for reference in dropped:
        heap.decref(reference)
    return target


def body_proxy(heap, body):
    """A proxy (not remembered) of the body of a FORWARD: an object of a version of a structure type."""
    type_id = heap.type_at(body) if body else None
    cls = heap.classes.get(type_id)
    if cls is None or cls._ps_kind != "structure":
        raise CorruptStorageError(f"{heap.name}: a forwarded object's body at {body:#x} is not a structure "
                                  f"(type {type_id})")
    return heap.view_of(cls, body)


def forward_class(storage, layouts):
    """The proxy class of FORWARDs in ``storage`` (heap type id ``T_FORWARD``): making a proxy of one
    makes the old-version proxy of its body's type, over the FORWARD's header."""
    heap = storage._heap

    def make(cls, segment, local):
        body = F.UINT64.unpack_from(segment.map, local + 8)[0]
        heap.check_offset(body, 8)
        current = heap.classes.get(heap.type_at(body))
        if (current is not None and current._ps_kind == "structure" and not current.__dict__.get("_ps_old")
                and body not in heap.created and not storage.readonly):
            # A committed body of the current version, in the writer: the fast proxy, over the body
            # (its object id, set by the heap, is the FORWARD's offset); the current version does not
            # change while the storage is open, so the body stays.  A body made in this transaction
            # could go with a rollback, and a reader's could go with a later writer's change: there
            # the object is read through the FORWARD's header, on every access.
            body_segment, body_local = heap.locate(body, current._ps_extent)
            return current._ps_make(body_segment, body_local)
        if current is None or current._ps_kind != "structure" or current.__dict__.get("_ps_old"):
            current = getattr(current, "__bases__", (None,))[0] if current is not None else None
        if current is None or getattr(current, "_ps_kind", None) != "structure":
            raise CorruptStorageError(f"{heap.name}: the forwarded object at {segment.start + local:#x} "
                                      f"has a body at {body:#x} that is not a structure")
        return old_version_class(current, layouts).from_address(segment.address + local)

    def references(cls, heap, offset, type_id):
        return [F.FORWARD.unpack_from(heap.mapping.view(offset, F.FORWARD.size))[2]]

    return PersistentMeta("Forward", (Persistent,), {
        "__slots__": (), "_fields_": [("_ps_body", ctypes.c_uint64)], "_storage": storage, "_heap": heap,
        "_ps_kind": "forward", "_ps_make": classmethod(make), "_ps_references": classmethod(references),
        "_ps_validate": lambda proxy, room: None,  # (never called: makes the heap take its slow path)
        "__module__": __name__})
