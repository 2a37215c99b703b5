"""One job: ``to_python``, which turns proxies into plain Python values.

It walks the persistent objects breadth first with an explicit queue (no
recursion, so a linked list of 10^5 structures converts like a short one) and
keeps a memo keyed by each object's identity (its storage and its address in
the map), as ``copy.deepcopy`` does: an object reached twice converts once,
to one Python object, so shared objects stay shared and a cycle becomes a
cyclic Python structure.  Breadth first, every object is first met at its
least depth, so with a ``depth`` limit the memo never hands out a conversion
cut shorter than another path would allow.
"""

import collections
import ctypes
import operator

from ._types import Persistent

__all__ = ["to_python"]

_CONTAINERS = {"structure": dict, "list": list, "dict": dict, "sorteddict": dict}


def to_python(obj, depth=None):
    """A plain Python value with the contents of proxy ``obj``, converted ``depth`` levels deep.

    ===========================  ==========================================================
    persistent object            becomes
    ===========================  ==========================================================
    Structure                    ``dict`` of field name -> value (by-value fields as
                                 ``int``/``float``/``bool``; an empty reference as None)
    List                         ``list``
    Dict, SortedDict             ``dict`` (in their order); String keys become ``str``,
                                 ByteString keys ``bytes``
    Set                          ``set`` (its elements, numbers or strings, become ``int``,
                                 ``float``, ``str`` or ``bytes``: always hashable)
    String, ByteString           ``str``, ``bytes``
    Buffer                       ``memoryview(buf).tolist()`` (nested lists for several
                                 dimensions) when memoryview can unpack its format, else
                                 ``bytes(buf)``
    anything else                itself (plain values pass through; plain containers are
                                 not entered)
    ===========================  ==========================================================

    ``depth=None`` converts everything reachable; ``depth=0`` returns ``obj``
    unchanged; ``depth=n`` converts ``n`` levels (``obj`` is level 1) and
    leaves the persistent objects below as proxies (keys and set elements
    convert with their collection).  Like ``copy.deepcopy``, an object reached
    twice converts to the same Python object, so sharing is kept and a cycle
    becomes a cyclic Python structure; an object converted because some path
    reaches it within ``depth`` levels is that converted value wherever it
    appears, and only objects that no such path reaches stay proxies.  No
    recursion is involved, so long chains are fine.

    Cost: O(objects converted + their elements and fields); every converted
    object is read once, and the result lives in memory.

    >>> import json
    >>> from permastruct import Storage, Dict, List, to_python
    >>> class S(Storage):
    ...     def populateSchema(self):
    ...         class Agent(self.schema.Structure):
    ...             name = self.schema.String
    ...             age = self.schema.Int
    ...         Agents = self.define(List("Agents")[Agent])
    ...         self.define(Dict("Teams")[self.schema.String, Agents])
    >>> p = S(None)
    >>> bond = p.schema.Agent(name="Bond", age=37)
    >>> teams = p.schema.Teams({"00": [bond, p.schema.Agent(name="Trevelyan")], "MI6": [bond]})
    >>> plain = to_python(teams)
    >>> plain["00"]
    [{'name': 'Bond', 'age': 37}, {'name': 'Trevelyan', 'age': 0}]
    >>> plain["00"][0] is plain["MI6"][0]  # one persistent Agent, one dict
    True
    >>> json.dumps(plain["MI6"])
    '[{"name": "Bond", "age": 37}]'
    >>> to_python(teams, depth=1)["MI6"]
    <persistent Agents object @offset 0x...: [<persistent Agent object @offset 0x...>] (1 item)>
    >>> to_python(3.5), to_python(teams, depth=0) is teams
    (3.5, True)
    """
    if depth is not None:
        depth = operator.index(depth)
        if depth < 0:
            raise ValueError(f"depth must be None or at least 0, not {depth}")
    if depth == 0 or not isinstance(obj, Persistent):
        return obj
    memo = {}
    queue = collections.deque()  # (proxy, its empty Python container, levels left below it)

    def convert(value, levels):
        """``value`` converted with ``levels`` levels left (None: no limit); containers are filled later."""
        if not isinstance(value, Persistent):
            return value
        cls = type(value)
        key = (id(cls._storage), ctypes.addressof(value))
        done = memo.get(key)
        if done is not None:
            return done[0]
        if levels == 0:
            return value
        kind = cls._ps_kind
        container = _CONTAINERS.get(kind)
        if container is not None:
            result = container()
            queue.append((value, result, None if levels is None else levels - 1))
        elif kind == "set":
            result = {_key(element) for element in value}
        elif kind == "string":
            result = value.contents
        elif kind == "buffer":
            result = _buffer(value)
        else:  # pragma: no cover - every proxy kind is listed above
            raise TypeError(f"to_python cannot convert a persistent {cls.__name__} ({kind})")
        memo[key] = (result, value)  # the proxy is kept: its address stays its own meanwhile
        return result

    result = convert(obj, depth)
    while queue:
        proxy, target, levels = queue.popleft()
        kind = type(proxy)._ps_kind
        if kind == "structure":
            for name in type(proxy)._ps_field_types:
                target[name] = convert(getattr(proxy, name), levels)
        elif kind == "list":
            target.extend([convert(element, levels) for element in proxy])
        else:
            for key, value in proxy.items():
                target[_key(key)] = convert(value, levels)
    return result


def _key(value):
    """A key or set element as a plain value: numbers as they are, strings as ``str``/``bytes``."""
    if isinstance(value, Persistent):
        return value.contents
    return value


def _buffer(buf):
    """A Buffer's values: nested lists when memoryview can unpack its format, else its bytes."""
    with memoryview(buf) as view:
        try:
            return view.tolist()
        except (NotImplementedError, TypeError, ValueError):  # e.g. '<d', 'T{...}', '2i'
            return bytes(buf)

