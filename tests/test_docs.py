"""docs/api.rst documents every public name: these tests fail when an entry is missing.

An *entry* of docs/api.rst is a definition-list item: a term line at the left
margin that starts with a double-backquoted literal, followed by an indented
body.  The literals on a term line name what the entry documents, through the
names the page uses for its examples (``p`` a Storage, ``lst`` a List proxy,
...: the table at the top of the page, and ``PREFIXES`` below):
``p.commit()`` documents ``Storage.commit``, ``lst.append(value)`` the
``append`` method of List proxies, ``StorageClosedError`` the class, and
``python3 -m permastruct check FILE`` the ``check`` command.  A name only
mentioned in prose, a table or an example does not count.

The public names are collected from the objects themselves, not from a list
kept here: ``permastruct.__all__``, ``permastruct.errors.__all__`` and
``permastruct.pages.__all__``; what ``dir()`` shows of a storage and of a
proxy of each kind (a proxy's ``dir()`` is its API, without ``ctypes``'
machinery); the commands the command line's ``--help`` lists.  A name a
proxy inherits from the common proxy base is documented once, as
``obj.name``; the methods a String or ByteString proxy takes from ``str`` or
``bytes`` are one entry (``text.<str method>(...)``).

The other way round, an entry may not name what does not exist:
``test_entries_name_what_exists`` fails on an entry for a method that is
gone (as ``Storage.references`` went when the object heap got its module).
"""

import contextlib
import io
import os
import re

import pytest

import permastruct
from permastruct import Dict, List, Set, SortedDict, Storage, cli, errors, pages
from permastruct._types import Persistent

API = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "api.rst")

#: The name docs/api.rst gives each kind of object in its entries.
PREFIXES = {"storage": "p", "list": "lst", "dict": "d", "set": "s", "sorteddict": "sd", "String": "text",
            "ByteString": "raw", "buffer": "buf", "any proxy": "obj", "registry": "p.stringRegistry",
            "PageFile": "pf", "Page": "page", "BufferManager": "bm", "PageHeader": "header"}


_TABLE_BORDER = re.compile(r"^=+( +=+)+$")  # two columns or more: not a heading's underline


def _entries(text):
    """``{term line: body}`` of every definition-list item at the left margin of ``text``.

    Rows of simple tables (between ``=== ===`` borders) are not entries, even
    where a row starts with a literal and continues on an indented line.
    """
    lines = text.splitlines()
    entries = {}
    index = 0
    in_table = False
    while index < len(lines):
        line = lines[index]
        if _TABLE_BORDER.match(line):
            # A table starts at a border and ends at a border followed by a blank line.
            if not in_table:
                in_table = True
            elif index + 1 == len(lines) or not lines[index + 1].strip():
                in_table = False
            index += 1
            continue
        if not in_table and line.startswith("``") and index + 1 < len(lines) \
                and lines[index + 1].startswith("    ") and lines[index + 1].strip():
            body = []
            index += 1
            while index < len(lines) and (not lines[index] or lines[index].startswith(" ")):
                body.append(lines[index])
                index += 1
            entries[line] = "\n".join(body)
            continue
        index += 1
    return entries


def _names(term):
    """The dotted names the literals of a term line start with (``p.commit()`` -> ``p.commit``)."""
    names = set()
    for literal in re.findall(r"``(.+?)``", term):
        command = re.match(r"python3? -m permastruct (\w+)", literal)
        if command:
            names.add("command " + command.group(1))
            continue
        head = re.match(r"[A-Za-z_][\w.]*", literal)
        if head:
            names.add(head.group(0).rstrip("."))
        names.add(literal)  # whole, for the entries of delegated methods
    return names


@pytest.fixture(scope="module")
def documented():
    """``{name: the body of the entry that documents it}``."""
    with open(API, encoding="utf-8") as handle:
        entries = _entries(handle.read())
    found = {}
    for term, body in entries.items():
        for name in _names(term):
            found.setdefault(name, body)
    return found


def _public(obj):
    return sorted(name for name in dir(obj) if not name.startswith("_"))


def _owner(cls, name):
    """The class of ``cls``'s MRO that defines ``name``."""
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def _proxy_names(proxy, prefix):
    """``{name: the dotted name its entry must have}`` for the public API of ``proxy``."""
    wanted = {}
    for name in _public(proxy):
        where = PREFIXES["any proxy"] if _owner(type(proxy), name) is Persistent else prefix
        wanted[name] = f"{where}.{name}"
    return wanted


class _Everything(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):
            age = s.Int

        self.define(List("Numbers")[s.Int])
        self.define(Dict("Stock")[s.String, s.Int])
        self.define(Set("Tags")[s.String])
        self.define(SortedDict("Prices")[s.Int, s.String])

        class Root(s.Structure):
            agent = Agent


@pytest.fixture(scope="module")
def store():
    p = _Everything.memory()
    yield p
    p.close()


def _missing(wanted, documented):
    return sorted(f"{name} (as {entry})" for name, entry in wanted.items() if entry not in documented)


def test_package_names(documented):
    names = set(permastruct.__all__) | set(errors.__all__)
    missing = sorted(name for name in names
                     if name not in documented and f"permastruct.{name}" not in documented)
    assert not missing, f"docs/api.rst has no entry for {', '.join(missing)}"


def test_storage(documented, store):
    missing = sorted(name for name in _public(store)
                     if f"p.{name}" not in documented and f"Storage.{name}" not in documented)
    assert not missing, f"docs/api.rst has no entry for Storage.{', Storage.'.join(missing)}"
    wanted = {name: f"{PREFIXES['registry']}.{name}" for name in _public(store.stringRegistry)}
    assert not _missing(wanted, documented), _missing(wanted, documented)


@pytest.mark.parametrize("kind", ["list", "dict", "set", "sorteddict"])
def test_collection_proxies(documented, store, kind):
    proxy = {"list": store.schema.Numbers, "dict": store.schema.Stock, "set": store.schema.Tags,
             "sorteddict": store.schema.Prices}[kind]()
    assert type(proxy)._ps_kind == kind
    missing = _missing(_proxy_names(proxy, PREFIXES[kind]), documented)
    assert not missing, f"docs/api.rst has no entry for {', '.join(missing)}"


@pytest.mark.parametrize("kind, value, python", [("String", "x", str), ("ByteString", b"x", bytes)])
def test_string_proxies(documented, store, kind, value, python):
    proxy = getattr(store.schema, kind)(value)
    prefix = PREFIXES[kind]
    own = {name: entry for name, entry in _proxy_names(proxy, prefix).items() if not hasattr(python, name)}
    assert own, "a string proxy has its own API (contents, isSameAs)"
    missing = _missing(own, documented)
    assert not missing, f"docs/api.rst has no entry for {', '.join(missing)}"
    group = f"{prefix}.<{python.__name__} method>(...)"
    assert group in documented, f"docs/api.rst has no entry {group} for the methods taken from {python.__name__}"


def test_buffer_and_structure_proxies(documented, store):
    buffer = store.schema.Buffer(b"abc")
    missing = _missing(_proxy_names(buffer, PREFIXES["buffer"]), documented)
    agent = store.schema.Agent(age=1)
    fields = set(type(agent)._ps_field_types)
    missing += _missing({name: entry for name, entry in _proxy_names(agent, "agent").items()
                         if name not in fields}, documented)
    assert not missing, f"docs/api.rst has no entry for {', '.join(missing)}"


def test_page_layer(documented, tmp_path):
    missing = sorted(name for name in pages.__all__ if name not in documented)
    with pages.PageFile(str(tmp_path / "pages.pf"), pageSize=512) as pf:
        page = pf.allocate_page()
        for obj, prefix in ((pf, "pf"), (page, "page"), (pf.buffer_manager, "bm"), (page.header, "header")):
            cls_name = type(obj).__name__
            missing += [f"{prefix}.{name}" for name in _public(obj)
                        if f"{prefix}.{name}" not in documented and f"{cls_name}.{name}" not in documented]
    assert not missing, f"docs/api.rst has no entry for {', '.join(missing)}"


def test_commands(documented):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["--help"], prog="permastruct") == 0
    listing = out.getvalue().split("commands:")[1].split("\n\n")[0]
    commands = re.findall(r"^    (\w+)\s", listing, re.MULTILINE)
    assert commands, f"no commands found in --help:\n{out.getvalue()}"
    missing = [name for name in commands if f"command {name}" not in documented]
    assert not missing, f"docs/api.rst has no entry for the command(s) {', '.join(missing)}"


def test_methods_say_what_they_cost(documented, store):
    """Every entry of a method of a storage or a proxy says what it costs."""
    proxies = [(store, "p"), (store.schema.Numbers(), "lst"), (store.schema.Stock(), "d"),
               (store.schema.Tags(), "s"), (store.schema.Prices(), "sd"), (store.schema.Buffer(b""), "buf")]
    silent = []
    for obj, prefix in proxies:
        for name in _public(obj):
            if not callable(getattr(type(obj), name, None)):
                continue  # an attribute or a property
            entry = f"p.{name}" if obj is store else _proxy_names(obj, prefix)[name]
            body = documented.get(entry, documented.get(f"Storage.{name}", ""))
            if "Cost" not in body:
                silent.append(entry)
    assert not silent, f"these entries of docs/api.rst do not say what the call costs: {', '.join(silent)}"


def test_entries_name_what_exists(documented, store, tmp_path):
    """The other way round: an entry's ``prefix.name`` is an attribute of that kind of object today
    (docs never describe what the code no longer does)."""
    with pages.PageFile(str(tmp_path / "pages.pf"), pageSize=512) as pf:
        page = pf.allocate_page()
        objects = {"p": store, "Storage": Storage, "lst": store.schema.Numbers(), "d": store.schema.Stock(),
                   "s": store.schema.Tags(), "sd": store.schema.Prices(), "text": store.schema.String("x"),
                   "raw": store.schema.ByteString(b"x"), "buf": store.schema.Buffer(b"x"),
                   "obj": store.schema.Agent(), "agent": store.schema.Agent(),
                   "p.stringRegistry": store.stringRegistry, "pf": pf, "page": page, "bm": pf.buffer_manager,
                   "header": page.header, "PageHeader": pages.PageHeader, "permastruct": permastruct}
        stale = []
        for name in documented:
            if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
                continue  # a whole literal, a command
            prefix, _, attribute = name.rpartition(".")
            if prefix == "agent" or prefix not in objects:
                continue  # agent.field: a field of the example's own type
            if attribute not in dir(objects[prefix]):  # (dir() reads no property: some need a pinned page)
                stale.append(name)
    assert not stale, f"docs/api.rst documents what does not exist: {', '.join(sorted(stale))}"


def test_the_entry_finder_sees_a_deleted_entry():
    """The parser itself: an entry removed from the text is no longer found."""
    text = "``p.commit()``\n    Commit.\n\n``p.close()``\n    Close.\n"
    assert {"p.commit", "p.close"} <= set().union(*map(_names, _entries(text)))
    without = text.replace("``p.close()``\n    Close.\n", "")
    assert "p.close" not in set().union(*map(_names, _entries(without)))
    assert "p.close" not in set().union(*map(_names, _entries("Prose that mentions ``p.close()``.\n")))
    table = "=======  ====\n``List``  a list;\n         more\n=======  ====\n\n"
    assert not _entries(table), "a table row is not an entry"
    assert _entries(table + "``List``\n    A list.\n")
