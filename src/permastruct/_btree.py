"""``SortedDict``: a persistent dict ordered by key, a B+tree of one-page nodes.

Theory of operation
===================

The COLLECTION header holds ``count`` (items), ``body`` (the root ``NODE``)
and ``aux`` (a modification number iterators watch).  Every node is one
internal object filling a one-page run (byte layout in
:mod:`permastruct._format`): a leaf flag, the key count ``n``, for leaves the
next and previous leaf, then ``order + 1`` key cells and either ``order + 1``
value cells (a leaf) or ``order + 2`` child offsets and ``order + 2`` subtree
counts (an inner node).  ``order`` (:func:`tree_order`) is the most keys a
node keeps: about 165 with 4 KiB pages; the one extra cell lets a node
overflow by one before it splits.

Invariants (``Storage.check()`` verifies each one):

- every node but the root holds between ``order // 2`` and ``order`` keys;
  an inner root holds at least one key; an empty tree has no root;
- keys increase strictly inside a node; in an inner node every key of child
  ``i`` is below separator ``i`` and every key of child ``i + 1`` is at least
  separator ``i`` (a separator is a copy of the smallest key of the subtree
  to its right at the time of the split);
- separators are cells like the keys: a string separator is a reference and
  holds its own reference count (one per cell that holds the string);
- ``counts[i]`` of an inner node is the number of items in subtree ``i``, so
  ``peekitem(i)``, ``index`` and ``bisect`` descend in O(log n) without
  visiting leaves, and ``count`` of the collection is their sum;
- all leaves are at the same depth and linked both ways in key order, the
  first with no previous and the last with no next leaf;
- key and value cells past ``n`` are zero.

Insertion descends to the leaf (``bisect`` over a node's key cells, a typed
memoryview, or over the strings they name), shifts the cells right with one
slice assignment and splits an overfull node in halves, pushing a separator
up (a root split grows the tree).  Deletion shifts left and restores the
minimum fill by borrowing from a sibling or merging with it (a root left
with one child is replaced by it).
"""

import bisect
import collections.abc as abc
import itertools
from array import array

from . import _format as F
from . import _types as T
from ._cells import Cell, Key, Missing, unhashable, value_checker
from ._collection import Collection, MappingMixin
from .errors import PermastructError, SchemaError


# -- SortedDict: a B+tree of one-page nodes ----------------------------------------------------
def tree_order(page_size):
    """The most keys a B+tree node of a store with ``page_size`` holds."""
    return (page_size - F.RUN_OBJECT - F.NODE.size - 40) // 24


class _NodeView:
    """Cached views of one B+tree NODE: header fields, keys, values or children and counts."""

    __slots__ = ("offset", "leaf", "head16", "head64", "keys", "values", "children", "counts", "raw", "tree")

    def __init__(self, heap, offset, order, key_code, value_code, tree=None):
        heap.check_offset(offset, node_size(heap))
        raw = heap.mapping.view(offset, node_size(heap))
        self.tree = tree  # the proxy class of the SortedDict type owning the node
        self.offset = offset
        self.raw = raw
        self.head16 = raw[:F.NODE.size].cast("H")
        self.head64 = raw[:F.NODE.size].cast("Q")
        self.leaf = bool(raw[12])
        keys_at = F.NODE.size
        values_at = keys_at + F.CELL * (order + 1)
        self.keys = raw[keys_at:values_at].cast(key_code)
        if self.leaf:
            self.values = raw[values_at:values_at + F.CELL * (order + 1)].cast(value_code)
            self.children = self.counts = None
        else:
            self.values = None
            counts_at = values_at + F.CELL * (order + 2)
            self.children = raw[values_at:counts_at].cast("Q")
            self.counts = raw[counts_at:counts_at + F.CELL * (order + 2)].cast("Q")

    @property
    def n(self):
        return self.head16[7]

    @n.setter
    def n(self, value):
        self.head16[7] = value


def node_size(heap):
    return heap.pf.page_size - F.RUN_OBJECT


class _StringKeys:
    """The keys of a node as bytes, for bisect (string keys are references)."""

    __slots__ = ("keys", "data")

    def __init__(self, keys, data):
        self.keys, self.data = keys, data

    def __getitem__(self, index):
        return self.data(self.keys[index])


class PersistentSortedDict(MappingMixin, Collection):
    """A persistent dict ordered by key: a B+tree of pages with O(log n) operations.

    >>> from permastruct import Storage, SortedDict
    >>> class S(Storage):
    ...     def populateSchema(self):
    ...         self.define(SortedDict("ByAge")[self.schema.Int, self.schema.String])
    >>> p = S(None)
    >>> by_age = p.schema.ByAge({37: "Bond", 60: "M", 25: "Q"})
    >>> list(by_age.irange(30, 70)), str(by_age[25]), by_age.peekitem(-1)[0], by_age.bisect_left(40)
    ([37, 60], 'Q', 60, 2)
    """

    __slots__ = ()
    _ps_kind = "sorteddict"
    _ps_body_type = F.T_NODE

    @classmethod
    def _ps_prepare(cls, heap):
        key_type = cls._ps_params[0]
        cls._ps_key = Key(heap, key_type, cls.__name__, "key")
        cls._ps_value = Cell(heap, cls._ps_params[1], cls.__name__, "value")
        if cls._ps_value.is_ref:
            cls._ps_value_check = staticmethod(value_checker(heap, cls._ps_params[1], f"{cls.__name__} value"))
        cls._ps_order = tree_order(heap.pf.page_size)
        cls._ps_string_data = heap.string_data if cls._ps_key.is_ref else None
        if cls._ps_order < 4:
            raise SchemaError(f"{cls.__name__}: pages of {heap.pf.page_size} bytes are too small "
                              "for a B+tree node")

    @staticmethod
    def _ps_accepts(value):
        return isinstance(value, abc.Mapping)

    # -- nodes --
    def _ps_node(self, offset):
        cls = type(self)
        heap = cls._heap
        node = heap.views.get(offset)
        if type(node) is not _NodeView or node.tree is not cls:
            # children and leaf links are offsets read from the file: what is cached
            # there may be another collection's array, table or node
            if node is not None:
                raise self._ps_bad(f"its tree links to {offset:#x}, which is not one of its nodes")
            self._ps_check_internal(offset, F.T_NODE, node_size(heap))
            try:
                node = _NodeView(heap, offset, cls._ps_order, cls._ps_key.code, cls._ps_value.code, cls)
            except IndexError:
                raise self._ps_bad(f"its node at {offset:#x} crosses the end of a mapped segment") from None
            if node.n > cls._ps_order + 1:
                raise self._ps_bad(f"its node at {offset:#x} has {node.n} keys")
            heap.views[offset] = node
        return node

    def _ps_new_node(self, heap, leaf):
        offset = self._ps_internal(heap, F.T_NODE, node_size(heap))
        heap.mapping.view(offset + 12, 1)[0] = 1 if leaf else 0
        return self._ps_node(offset)

    def _ps_searchable(self, node):
        """The keys of ``node`` as a sequence bisect can search."""
        if type(self)._ps_key.is_ref:
            return _StringKeys(node.keys, type(self)._heap.string_data)
        return node.keys

    def _ps_descend(self, probe):
        """``(path, leaf)``: the inner nodes with the child index taken, and the leaf for ``probe``."""
        cls = type(self)
        views = cls._heap.views
        string_data = cls._ps_string_data
        path = []
        offset = self._ps_body
        for _ in range(64):
            node = views.get(offset)
            if type(node) is not _NodeView or node.tree is not cls:
                node = self._ps_node(offset)
            if node.leaf:
                return path, node
            keys = node.keys if string_data is None else _StringKeys(node.keys, string_data)
            index = bisect.bisect_right(keys, probe, 0, node.head16[7])
            path.append((node, index))
            offset = node.children[index]
        raise self._ps_bad("its tree is deeper than 64 levels")

    def _ps_find(self, key):
        """``(path, leaf, index)`` of ``key``; raises Missing."""
        if not self._ps_body:
            unhashable(key)
            raise Missing
        probe = type(self)._ps_key.lookup(key)[1]
        path, leaf = self._ps_descend(probe)
        string_data = type(self)._ps_string_data
        keys = leaf.keys if string_data is None else _StringKeys(leaf.keys, string_data)
        n = leaf.head16[7]
        index = bisect.bisect_left(keys, probe, 0, n)
        if index < n and keys[index] == probe:
            return path, leaf, index
        raise Missing

    def _ps_decode(self, node, index):
        cls = type(self)
        key = node.keys[index]
        if cls._ps_key.decode is not None:
            key = cls._ps_key.decode(key)
        value = node.values[index]
        if cls._ps_value.decode is not None:
            value = cls._ps_value.decode(value)
        return key, value

    # -- reading --
    def __getitem__(self, key):
        """``sd[key]``; ``KeyError`` if absent.

        Runtime: O(log n): one bisect over a node's key cells per level.
        """
        try:
            path, leaf, index = self._ps_find(key)
        except Missing:
            raise KeyError(key) from None
        value = leaf.values[index]
        decode = type(self)._ps_value.decode
        return value if decode is None else decode(value)

    def __contains__(self, key):
        """``key in sd``.

        Runtime: O(log n).
        """
        try:
            self._ps_find(key)
        except Missing:
            return False
        return True

    def _ps_runs(self, node, index, remaining, reverse=False):
        """``(leaf, lo, hi)``: runs of positions of consecutive leaves, ``remaining`` in all (None: to
        the last leaf), from position ``index`` of leaf ``node`` onwards (``reverse``: downwards),
        watching changes.

        A leaf link that leads to an inner node, or more leaves than the
        elements there can be (a cycle of leaves), is damage.
        """
        version = self._ps_aux
        heap = type(self)._heap
        moves = heap.moves
        string_data = type(self)._ps_string_data
        steps = 2 * self._ps_count + 2  # elements plus leaves: every leaf but an empty root holds a key
        if remaining is None:
            remaining = float("inf")
        while node is not None and remaining > 0:
            if self._ps_aux != version:
                raise RuntimeError(f"{type(self).__name__} changed size during iteration")
            steps -= 1
            if steps < 0:
                raise self._ps_bad(f"its leaves link in a cycle (through {node.offset:#x})")
            if reverse:
                hi = min(index + 1, node.n)
                lo = max(0, hi - remaining)
                link = node.head64[3]
            else:
                lo = index
                hi = min(node.n, lo + remaining)
                link = node.head64[2]
            if hi > lo:
                remaining -= hi - lo
                steps -= hi - lo
                if steps < 0:
                    raise self._ps_bad(f"its leaves link in a cycle (through {node.offset:#x})")
                edge = node.keys[lo if reverse else hi - 1]  # (read now: the leaf may move meanwhile)
                if string_data is not None:
                    edge = string_data(edge)
                yield node, lo, hi
                if self._ps_aux != version:  # the link read above may name a node freed since
                    raise RuntimeError(f"{type(self).__name__} changed size during iteration")
                if heap.moves != moves:  # a pack moved nodes (or a refresh, rollback or undo put the
                    moves = heap.moves  # tree elsewhere): the next position is found again by its key
                    steps -= 1
                    node = self._ps_descend(edge)[1]
                    keys = node.keys if string_data is None else _StringKeys(node.keys, string_data)
                    if reverse:
                        index = bisect.bisect_left(keys, edge, 0, node.n) - 1
                    else:
                        index = bisect.bisect_right(keys, edge, 0, node.n)
                    continue
            node = self._ps_leaf(link) if link and remaining > 0 else None
            index = node.n - 1 if reverse and node is not None else 0

    def _ps_scan(self, node, index, remaining, reverse=False, keys=True, values=False):
        """The keys, values or ``(key, value)`` pairs of ``remaining`` positions from ``index`` of
        leaf ``node`` (see :meth:`_ps_read_runs`)."""
        return itertools.chain.from_iterable(
            self._ps_read_runs(self._ps_runs(node, index, remaining, reverse), reverse, keys, values))

    def _ps_read_runs(self, runs, reverse, keys, values):
        """Lists of the keys, values or pairs of each ``(leaf, lo, hi)`` of ``runs``, for
        ``itertools.chain`` to hand out.

        Each leaf's cells are read with one slice and decoded at once (a
        decoded reference is a proxy, which keeps its object alive whatever
        the loop does meanwhile).  The runs watch the modification number
        between leaves and after the last one: a change in size made during a
        scan raises ``RuntimeError`` once the pairs of the leaf being read are
        handed out, at the latest.
        """
        cls = type(self)
        kdecode, vdecode = cls._ps_key.decode, cls._ps_value.decode
        for leaf, lo, hi in runs:
            if keys:
                run_keys = leaf.keys[lo:hi].tolist()
                if kdecode is not None:
                    run_keys = list(map(kdecode, run_keys))
            if values:
                run_values = leaf.values[lo:hi].tolist()
                if vdecode is not None:
                    run_values = list(map(vdecode, run_values))
            run = list(zip(run_keys, run_values)) if keys and values else run_keys if keys else run_values
            if reverse:
                run.reverse()
            yield run

    def _ps_bounded_runs(self, low, high, include_low, include_high, reverse, version):
        """``(leaf, lo, hi)`` runs of the keys between the bounds (None: open), found with one
        descent to the leaf of the first bound and key compares in the leaf of the second;
        ``version`` is the modification number when the scan was asked for."""
        string_data = type(self)._ps_string_data
        if self._ps_aux != version:
            raise RuntimeError(f"{type(self).__name__} changed size during iteration")
        first = high if reverse else low
        if first is None:
            leaf = self._ps_edge_leaf(reverse)
            index = leaf.n - 1 if reverse else 0
        else:
            leaf = self._ps_descend(first)[1]
            found = leaf.keys if string_data is None else _StringKeys(leaf.keys, string_data)
            if reverse:
                index = (bisect.bisect_right if include_high else bisect.bisect_left)(found, high, 0, leaf.n) - 1
            else:
                index = (bisect.bisect_left if include_low else bisect.bisect_right)(found, low, 0, leaf.n)
        last = low if reverse else high
        for leaf, lo, hi in self._ps_runs(leaf, index, None, reverse):
            if last is not None:
                found = leaf.keys if string_data is None else _StringKeys(leaf.keys, string_data)
                if reverse:
                    edge = found[lo]
                    if edge < low or (edge == low and not include_low):
                        lo = (bisect.bisect_left if include_low else bisect.bisect_right)(found, low, lo, hi)
                        break
                else:
                    edge = found[hi - 1]
                    if edge > high or (edge == high and not include_high):
                        hi = (bisect.bisect_right if include_high else bisect.bisect_left)(found, high, lo, hi)
                        break
            yield leaf, lo, hi
        else:
            return  # the runs watched the modification number to the end
        if lo < hi:  # the last run, cut at the far bound
            yield leaf, lo, hi
            if self._ps_aux != version:
                raise RuntimeError(f"{type(self).__name__} changed size during iteration")

    def _ps_leaf(self, offset):
        """The node at ``offset``, which a leaf link names: it must be a leaf."""
        node = self._ps_node(offset)
        if not node.leaf:
            raise self._ps_bad(f"a leaf links to {offset:#x}, which is an inner node")
        return node

    def _ps_child(self, node, index, depth):
        """Child ``index`` of inner ``node`` at ``depth`` levels below the root (bounded: a cycle is damage)."""
        if depth >= 64:
            raise self._ps_bad("its tree is deeper than 64 levels")
        return self._ps_node(node.children[index])

    def _ps_edge_leaf(self, last):
        node = self._ps_node(self._ps_body)
        depth = 0
        while not node.leaf:
            depth += 1
            node = self._ps_child(node, node.n if last else 0, depth)
        return node

    def _ps_all(self, reverse=False, keys=True, values=False):
        if not self._ps_count:
            return iter(())
        leaf = self._ps_edge_leaf(reverse)
        return self._ps_scan(leaf, leaf.n - 1 if reverse else 0, None, reverse, keys, values)

    def __iter__(self):
        """The keys in increasing order; a change in size meanwhile raises ``RuntimeError``.

        Runtime: O(1) per key; each leaf's keys are read with one slice.
        """
        return self._ps_all()

    def __reversed__(self):
        """The keys in decreasing order.

        Runtime: O(1) per key.
        """
        return self._ps_all(reverse=True)

    def _ps_items(self):
        return self._ps_all(keys=True, values=True)

    def _ps_iter_values(self):
        return self._ps_all(keys=False, values=True)

    def _ps_position_of(self, probe, right):
        """The number of keys below ``probe`` (or not above it, if ``right``)."""
        if not self._ps_count:
            return 0
        node = self._ps_node(self._ps_body)
        position = depth = 0
        search = bisect.bisect_right if right else bisect.bisect_left
        while not node.leaf:
            index = bisect.bisect_right(self._ps_searchable(node), probe, 0, node.n)
            position += sum(node.counts[:index].tolist())
            depth += 1
            node = self._ps_child(node, index, depth)
        return position + search(self._ps_searchable(node), probe, 0, node.n)

    def bisect_left(self, key):
        """The index where ``key`` is or would be inserted, before equal keys.

        Runtime: O(log n): the subtree counts are summed on the way down.
        """
        return self._ps_position_of(type(self)._ps_key.bound(key), right=False)

    def bisect_right(self, key):
        """The index after the position of ``key``.

        Runtime: O(log n).
        """
        return self._ps_position_of(type(self)._ps_key.bound(key), right=True)

    bisect = bisect_right

    def index(self, key):
        """The position of ``key`` in key order; ``ValueError`` if it is absent.

        Runtime: O(log n).
        """
        if key not in self:
            raise ValueError(f"{key!r} is not in {type(self).__name__}")
        return self.bisect_left(key)

    def _ps_at(self, index):
        """``(leaf, position in leaf)`` of the element at sorted ``index`` (may be negative)."""
        count = self._ps_count
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"{type(self).__name__} indices must be integers, not {type(index).__name__}") from None
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"{type(self).__name__} index out of range")
        node = self._ps_node(self._ps_body)
        depth = 0
        while not node.leaf:
            counts = node.counts[:node.n + 1].tolist()
            child = 0
            while index >= counts[child]:
                index -= counts[child]
                child += 1
                if child == len(counts):
                    raise self._ps_bad(f"the subtree counts of its node {node.offset:#x} do not add up")
            depth += 1
            node = self._ps_child(node, child, depth)
        if index >= node.n:
            raise self._ps_bad(f"the subtree counts above its leaf {node.offset:#x} do not add up")
        return node, index

    def peekitem(self, index=-1):
        """The ``(key, value)`` at sorted position ``index`` (``IndexError`` if out of range).

        Runtime: O(log n): the subtree counts lead to the leaf.
        """
        node, position = self._ps_at(index)
        return self._ps_decode(node, position)

    def irange(self, minimum=None, maximum=None, inclusive=(True, True), reverse=False):
        """Iterate over the keys from ``minimum`` to ``maximum`` (None: unbounded), in order.

        ``inclusive`` says whether each bound is included; ``reverse`` walks
        from the largest key down.  A bound that cannot be compared with the
        keys is a ``TypeError`` at the call.

        Runtime: O(log n) to find the ends, then O(1) per key, a leaf's keys read at once.
        """
        return self._ps_range(minimum, maximum, inclusive, reverse, keys=True, values=False)

    def irange_items(self, minimum=None, maximum=None, inclusive=(True, True), reverse=False):
        """Iterate over the ``(key, value)`` pairs with keys from ``minimum`` to ``maximum``, in order.

        The bounds, ``inclusive`` and ``reverse`` are those of :meth:`irange`.
        Each leaf's key and value cells are read with one slice each.

        Runtime: O(log n) to find the ends, then O(1) per pair.

        >>> from permastruct import Storage, SortedDict
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(SortedDict("Prices")[self.schema.Int, self.schema.Float])
        >>> p = S(None)
        >>> prices = p.schema.Prices({k: k / 2 for k in range(10)})
        >>> list(prices.irange_items(3, 6, inclusive=(True, False)))
        [(3, 1.5), (4, 2.0), (5, 2.5)]
        >>> list(prices.irange_items(maximum=1, reverse=True))
        [(1, 0.5), (0, 0.0)]
        """
        return self._ps_range(minimum, maximum, inclusive, reverse, keys=True, values=True)

    def _ps_range(self, minimum, maximum, inclusive, reverse, keys, values):
        key_type = type(self)._ps_key
        low = None if minimum is None else key_type.bound(minimum)  # a bad bound fails at the call
        high = None if maximum is None else key_type.bound(maximum)
        include_low, include_high = inclusive
        if not self._ps_count or low is not None and high is not None and (
                low > high or low == high and not (include_low and include_high)):
            return iter(())
        runs = self._ps_bounded_runs(low, high, include_low, include_high, reverse, self._ps_aux)
        return itertools.chain.from_iterable(self._ps_read_runs(runs, reverse, keys, values))

    # -- changing --
    def __setitem__(self, key, value):
        """``sd[key] = value``; a wrong key or value changes nothing.

        Runtime: O(log n); a split writes two more nodes per level that overflows.
        """
        heap = self._ps_storage()
        cls = type(self)
        key_type = cls._ps_key
        hash_, data = key_type.store(key)
        value_type = cls._ps_value
        cell = value_type.encode(value)
        referenced = value_type.is_ref and cell
        if referenced:
            heap.incref(cell)  # (first: it refuses an object with too many references)
        try:
            self._ps_store(heap, key, data, cell)
        except Exception as exc:
            if referenced:
                heap.decref(cell)
            if isinstance(exc, (ValueError, IndexError, OverflowError)) and not isinstance(exc, PermastructError):
                raise self._ps_damage(exc) from exc
            raise

    def _ps_bulk_store(self, heap, prepared):
        """Store checked ``(key, stored, value cell, holder)`` items (see ``update``): an empty tree
        is built bottom-up from the items sorted by key (the last of equal keys wins, as in a
        dict); a tree that holds items takes them one by one, in key order."""
        items = sorted(prepared, key=lambda item: item[1][1])  # stable: equal keys keep their order
        unique = [item for item, following in zip(items, items[1:] + [None])
                  if following is None or following[1][1] != item[1][1]]
        value_ref = type(self)._ps_value.is_ref
        if value_ref:  # every value's reference first (all or none), before anything is stored
            heap.incref_all(cell for _, _, cell, _ in unique)
        done = 0
        try:
            if not self._ps_body and len(unique) > 1:
                self._ps_build_tree(heap, unique)
                return
            for key, stored, cell, _ in unique:
                self._ps_store(heap, key, stored[1], cell)
                done += 1
        except Exception as exc:
            if value_ref:  # the values not stored give their references back
                for _, _, cell, _ in unique[done:]:
                    if cell:
                        heap.decref(cell)
            if isinstance(exc, (ValueError, IndexError, OverflowError)) and not isinstance(exc, PermastructError):
                raise self._ps_damage(exc) from exc
            raise

    def _ps_build_tree(self, heap, items):
        """Build the tree of an empty SortedDict from ``items`` sorted by key, without duplicates.

        Leaves are filled to about three quarters (room for later inserts),
        and every node but the root gets at least the minimum fill; each
        separator is the smallest key of the subtree to its right.
        """
        cls = type(self)
        order = cls._ps_order
        minimum = order // 2
        key_type, value_type = cls._ps_key, cls._ps_value
        key_code, value_code = key_type.code, value_type.code
        level = []  # (node, items below it, its smallest key cell)
        previous = None
        position = 0
        for size in _group_sizes(len(items), order * 3 // 4, minimum):
            leaf = self._ps_new_node(heap, leaf=True)
            run = items[position:position + size]
            position += size
            keys = [key_type.new_cell(key, stored[1]) for key, stored, _, _ in run]
            values = [cell for _, _, cell, _ in run]
            leaf.keys[:size] = memoryview(array(key_code, keys))
            leaf.values[:size] = memoryview(array(value_code, values))
            leaf.n = size  # (the values' references: taken by the caller, see _ps_bulk_store)
            if previous is not None:
                previous.head64[2], leaf.head64[3] = leaf.offset, previous.offset
            previous = leaf
            level.append((leaf, size, keys[0]))
        while len(level) > 1:
            parents = []
            position = 0
            for size in _group_sizes(len(level), order * 3 // 4 + 1, minimum + 1):
                node = self._ps_new_node(heap, leaf=False)
                group = level[position:position + size]
                position += size
                separators = [smallest for _, _, smallest in group[1:]]
                node.keys[:size - 1] = memoryview(array(key_code, separators))
                node.children[:size] = memoryview(array("Q", [child.offset for child, _, _ in group]))
                node.counts[:size] = memoryview(array("Q", [count for _, count, _ in group]))
                node.n = size - 1
                if key_type.is_ref:
                    for cell in separators:
                        heap.incref(cell)
                parents.append((node, sum(count for _, count, _ in group), group[0][2]))
            level = parents
        self._ps_body = level[0][0].offset
        self._ps_count = len(items)
        self._ps_aux += 1

    def _ps_damage(self, exc):
        """The CorruptStorageError for ``exc``, met while changing the tree: counts or links that do
        not add up (a subtree count going below zero, a node index past its keys) come from the file."""
        return self._ps_bad(f"its tree does not add up ({type(exc).__name__}: {exc})")

    def _ps_store(self, heap, key, data, cell):
        cls = type(self)
        key_type, value_type = cls._ps_key, cls._ps_value
        if not self._ps_body:
            leaf = self._ps_new_node(heap, leaf=True)
            self._ps_body = leaf.offset
        path, leaf = self._ps_descend(data)
        keys = self._ps_searchable(leaf)
        n = leaf.n
        index = bisect.bisect_left(keys, data, 0, n)
        if index < n and keys[index] == data:  # (the new value's reference: taken by the caller, first)
            old = leaf.values[index]
            leaf.values[index] = cell
            if value_type.is_ref and old:
                heap.decref(old)
            return
        key_cell = key_type.new_cell(key, data)
        leaf.keys[index + 1:n + 1] = leaf.keys[index:n]
        leaf.values[index + 1:n + 1] = leaf.values[index:n]
        leaf.keys[index], leaf.values[index] = key_cell, cell
        leaf.n = n + 1
        for node, child in path:
            node.counts[child] += 1
        self._ps_count += 1
        self._ps_aux += 1
        if leaf.n > cls._ps_order:
            self._ps_split(heap, path, leaf)

    def _ps_split(self, heap, path, node):
        """Split the overfull ``node`` and, as needed, its ancestors."""
        key_ref = type(self)._ps_key.is_ref
        while node.n > type(self)._ps_order:
            n = node.n
            half = n // 2
            right = self._ps_new_node(heap, node.leaf)
            if node.leaf:
                moved = n - half
                right.keys[:moved] = node.keys[half:n]
                right.values[:moved] = node.values[half:n]
                node.keys[half:n] = _zeros(node.keys, moved)
                node.values[half:n] = _zeros(node.values, moved)
                right.n, node.n = moved, half
                separator = right.keys[0]
                if key_ref:
                    heap.incref(separator)
                following = node.head64[2]
                right.head64[2], right.head64[3] = following, node.offset
                node.head64[2] = right.offset
                if following:
                    self._ps_node(following).head64[3] = right.offset
                left_count, right_count = half, moved
            else:
                # keys[half] moves up; the right node gets keys half+1.. and children half+1..
                separator = node.keys[half]
                moved = n - half - 1
                right.keys[:moved] = node.keys[half + 1:n]
                right.children[:moved + 1] = node.children[half + 1:n + 1]
                right.counts[:moved + 1] = node.counts[half + 1:n + 1]
                node.keys[half:n] = _zeros(node.keys, n - half)
                node.children[half + 1:n + 1] = _zeros(node.children, moved + 1)
                node.counts[half + 1:n + 1] = _zeros(node.counts, moved + 1)
                right.n, node.n = moved, half
                left_count = sum(node.counts[:half + 1].tolist())
                right_count = sum(right.counts[:moved + 1].tolist())
            if path:
                parent, child = path.pop()
                n = parent.n
                parent.keys[child + 1:n + 1] = parent.keys[child:n]
                parent.children[child + 2:n + 2] = parent.children[child + 1:n + 1]
                parent.counts[child + 2:n + 2] = parent.counts[child + 1:n + 1]
                parent.keys[child] = separator
                parent.children[child + 1] = right.offset
                parent.counts[child], parent.counts[child + 1] = left_count, right_count
                parent.n = n + 1
                node = parent
            else:
                root = self._ps_new_node(heap, leaf=False)
                root.keys[0] = separator
                root.children[0], root.children[1] = node.offset, right.offset
                root.counts[0], root.counts[1] = left_count, right_count
                root.n = 1
                self._ps_body = root.offset
                return

    def __delitem__(self, key):
        """``del sd[key]``; ``KeyError`` if absent.

        Runtime: O(log n); a borrow or merge writes a sibling and the parent per level.
        """
        heap = self._ps_storage()
        try:
            path, leaf, index = self._ps_find(key)
        except Missing:
            raise KeyError(key) from None
        self._ps_delete(heap, path, leaf, index)

    def _ps_delete(self, heap, path, leaf, index):
        try:
            self._ps_remove(heap, path, leaf, index)
        except (ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, PermastructError):
                raise
            raise self._ps_damage(exc) from exc

    def _ps_remove(self, heap, path, leaf, index):
        cls = type(self)
        n = leaf.n
        key_cell, value_cell = leaf.keys[index], leaf.values[index]
        leaf.keys[index:n - 1] = leaf.keys[index + 1:n]
        leaf.values[index:n - 1] = leaf.values[index + 1:n]
        leaf.keys[n - 1] = 0
        leaf.values[n - 1] = 0
        leaf.n = n - 1
        for node, child in path:
            node.counts[child] -= 1
        self._ps_count -= 1
        self._ps_aux += 1
        if cls._ps_key.is_ref:
            heap.decref(key_cell)
        if cls._ps_value.is_ref and value_cell:
            heap.decref(value_cell)
        self._ps_rebalance(heap, path, leaf)

    def _ps_rebalance(self, heap, path, node):
        """Restore the minimum fill of ``node`` and its ancestors after a removal."""
        cls = type(self)
        minimum = cls._ps_order // 2
        while True:
            if not path:  # the root
                if node.leaf and node.n == 0:
                    self._ps_body = 0
                    heap.drop_internal(node.offset)
                elif not node.leaf and node.n == 0:
                    self._ps_body = node.children[0]
                    node.children[0] = 0
                    node.counts[0] = 0
                    heap.drop_internal(node.offset)
                return
            if node.n >= minimum:
                return
            parent, child = path.pop()
            if child > 0:
                left = self._ps_sibling(parent, child - 1, node)
                if left.n > minimum:
                    self._ps_borrow_left(heap, parent, child, left, node)
                    return
            if child < parent.n:
                right = self._ps_sibling(parent, child + 1, node)
                if right.n > minimum:
                    self._ps_borrow_right(heap, parent, child, node, right)
                    return
            if child > 0:
                self._ps_merge(heap, parent, child - 1, self._ps_sibling(parent, child - 1, node), node)
            else:
                self._ps_merge(heap, parent, child, node, self._ps_sibling(parent, child + 1, node))
            node = parent

    def _ps_sibling(self, parent, index, node):
        """Child ``index`` of ``parent``, a sibling of ``node``: a leaf exactly when ``node`` is one."""
        sibling = self._ps_node(parent.children[index])
        if sibling.leaf != node.leaf or sibling is node:
            raise self._ps_bad(f"its node {parent.offset:#x} has leaves and inner nodes (or one node twice) "
                               "as children")
        return sibling

    def _ps_borrow_left(self, heap, parent, child, left, node):
        n, ln = node.n, left.n
        key_ref = type(self)._ps_key.is_ref
        node.keys[1:n + 1] = node.keys[0:n]
        if node.leaf:
            node.values[1:n + 1] = node.values[0:n]
            node.keys[0], node.values[0] = left.keys[ln - 1], left.values[ln - 1]
            left.keys[ln - 1] = left.values[ln - 1] = 0
            old = parent.keys[child - 1]
            parent.keys[child - 1] = node.keys[0]
            if key_ref:
                heap.incref(node.keys[0])
                heap.decref(old)
            moved = 1
        else:
            node.children[1:n + 2] = node.children[0:n + 1]
            node.counts[1:n + 2] = node.counts[0:n + 1]
            node.keys[0] = parent.keys[child - 1]
            node.children[0], node.counts[0] = left.children[ln], left.counts[ln]
            parent.keys[child - 1] = left.keys[ln - 1]
            moved = left.counts[ln]
            left.keys[ln - 1] = 0
            left.children[ln] = left.counts[ln] = 0
        left.n, node.n = ln - 1, n + 1
        parent.counts[child - 1] -= moved
        parent.counts[child] += moved

    def _ps_borrow_right(self, heap, parent, child, node, right):
        n, rn = node.n, right.n
        key_ref = type(self)._ps_key.is_ref
        if node.leaf:
            node.keys[n], node.values[n] = right.keys[0], right.values[0]
            right.keys[0:rn - 1] = right.keys[1:rn]
            right.values[0:rn - 1] = right.values[1:rn]
            right.keys[rn - 1] = right.values[rn - 1] = 0
            old = parent.keys[child]
            parent.keys[child] = right.keys[0]
            if key_ref:
                heap.incref(right.keys[0])
                heap.decref(old)
            moved = 1
        else:
            node.keys[n] = parent.keys[child]
            node.children[n + 1], node.counts[n + 1] = right.children[0], right.counts[0]
            parent.keys[child] = right.keys[0]
            moved = right.counts[0]
            right.keys[0:rn - 1] = right.keys[1:rn]
            right.children[0:rn] = right.children[1:rn + 1]
            right.counts[0:rn] = right.counts[1:rn + 1]
            right.keys[rn - 1] = 0
            right.children[rn] = right.counts[rn] = 0
        right.n, node.n = rn - 1, n + 1
        parent.counts[child + 1] -= moved
        parent.counts[child] += moved

    def _ps_merge(self, heap, parent, child, left, right):
        """Merge ``right`` (child ``child + 1`` of ``parent``) into ``left`` (child ``child``)."""
        ln, rn = left.n, right.n
        separator = parent.keys[child]
        if left.leaf:
            left.keys[ln:ln + rn] = right.keys[:rn]
            left.values[ln:ln + rn] = right.values[:rn]
            left.n = ln + rn
            following = right.head64[2]
            left.head64[2] = following
            if following:
                self._ps_node(following).head64[3] = left.offset
            if type(self)._ps_key.is_ref:
                heap.decref(separator)
        else:
            left.keys[ln] = separator
            left.keys[ln + 1:ln + 1 + rn] = right.keys[:rn]
            left.children[ln + 1:ln + 2 + rn] = right.children[:rn + 1]
            left.counts[ln + 1:ln + 2 + rn] = right.counts[:rn + 1]
            left.n = ln + 1 + rn
        n = parent.n
        parent.counts[child] += parent.counts[child + 1]
        parent.keys[child:n - 1] = parent.keys[child + 1:n]
        parent.children[child + 1:n] = parent.children[child + 2:n + 1]
        parent.counts[child + 1:n] = parent.counts[child + 2:n + 1]
        parent.keys[n - 1] = 0
        parent.children[n] = parent.counts[n] = 0
        parent.n = n - 1
        heap.drop_internal(right.offset)

    def popitem(self, index=-1):
        """Remove and return the ``(key, value)`` at sorted ``index`` (the largest by default).

        Runtime: O(log n).
        """
        heap = self._ps_storage()
        if not self._ps_count:
            raise KeyError(f"popitem(): {type(self).__name__} is empty")
        leaf, position = self._ps_at(index)
        key, value = self._ps_decode(leaf, position)
        path, leaf, position = self._ps_find(key)
        self._ps_delete(heap, path, leaf, position)
        return key, value

    def pop(self, key, default=MappingMixin._MARKER):
        """Remove ``key`` and return its value (or ``default``; ``KeyError`` without one).

        Runtime: O(log n).
        """
        heap = self._ps_storage()
        try:
            path, leaf, index = self._ps_find(key)
        except Missing:
            if default is MappingMixin._MARKER:
                raise KeyError(key) from None
            return default
        value = self._ps_decode(leaf, index)[1]
        self._ps_delete(heap, path, leaf, index)
        return value

    def clear(self):
        """Remove every item (the nodes are freed at once, the elements' references dropped).

        Runtime: O(n): every node is freed and every by-reference key and value loses a reference.
        """
        heap = self._ps_storage()
        if not self._ps_body:
            return
        cls = type(self)
        stack = [self._ps_body]
        dropped = []
        key_ref, value_ref = cls._ps_key.is_ref, cls._ps_value.is_ref
        while stack:
            node = self._ps_node(stack.pop())
            n = node.n
            if key_ref:
                dropped.extend(node.keys[:n].tolist())
            if node.leaf:
                if value_ref:
                    dropped.extend(c for c in node.values[:n].tolist() if c)
            else:
                stack.extend(node.children[:n + 1].tolist())
            heap.drop_internal(node.offset)
        self._ps_body = 0
        self._ps_count = 0
        self._ps_aux += 1
        for cell in dropped:
            heap.decref(cell)

    def copy(self):
        """A plain ``dict`` with the same items, in key order.

        Runtime: O(n).
        """
        return dict(self._ps_items())

    # -- heap hooks --
    @classmethod
    def _ps_references(cls, heap, offset, type_id):
        if type_id != F.T_NODE:
            header = F.COLLECTION.unpack_from(heap.mapping.view(offset, F.COLLECTION.size))
            return [header[3]] if header[3] else []
        node = _NodeView(heap, offset, cls._ps_order, cls._ps_key.code, cls._ps_value.code)
        n = min(node.n, cls._ps_order + 1)
        refs = []
        if cls._ps_key.is_ref:
            refs.extend(node.keys[:n].tolist())
        if node.leaf:
            if cls._ps_value.is_ref:
                refs.extend(c for c in node.values[:n].tolist() if c)
        else:
            refs.extend(node.children[:n + 1].tolist())
        return [r for r in refs if r]

    @classmethod
    def _ps_internal_size(cls, heap, offset, type_id):
        return node_size(heap) if type_id == F.T_NODE else None

    def _ps_check(self, referenced, fail):
        me = T.Persistent.__repr__(self)  # the short form: a preview would read what is checked
        cls = type(self)
        heap = cls._heap
        count, body = self._ps_count, self._ps_body
        if not body:
            if count:
                fail(f"{me} has {count} items but no tree")
            return
        referenced(body, None, f"{me} root")
        key_type = cls._ps_key
        order, minimum = cls._ps_order, cls._ps_order // 2
        leaves = []

        def sort_key(cell):
            return heap.string_data(cell) if key_type.is_ref else cell

        def walk(offset, low, high, depth, is_root):
            """Check the subtree at ``offset``; return (element count, leaf depth)."""
            if depth > 64:
                fail(f"{me}: the tree is deeper than 64 levels (a cycle?)")
            node = self._ps_node(offset)
            n = node.n
            where = f"{me} node {offset:#x}"
            if n > order or (not is_root and n < minimum) or (is_root and not node.leaf and n < 1):
                fail(f"{where} holds {n} keys (order {order})")
            keys = [sort_key(c) for c in node.keys[:n].tolist()]
            if key_type.is_ref:
                for cell in node.keys[:n].tolist():
                    referenced(cell, key_type.type, where + " key")
            if any(a >= b for a, b in zip(keys, keys[1:])):
                fail(f"{where}: keys are not in increasing order")
            if keys and ((low is not None and keys[0] < low) or (high is not None and keys[-1] >= high)):
                fail(f"{where}: keys outside the range its parent gives")
            if any(node.keys[n:order + 1].tolist()):
                fail(f"{where}: key cells after the last key are not empty")
            if node.leaf:
                values = node.values[:n].tolist()
                if cls._ps_value.is_ref:
                    for cell in values:
                        if cell:
                            referenced(cell, cls._ps_value.type, where + " value")
                leaves.append(offset)
                return n, depth
            total, leaf_depth = 0, None
            counts = node.counts[:n + 1].tolist()
            for index, child in enumerate(node.children[:n + 1].tolist()):
                referenced(child, None, where + f" child {index}")
                sub, sub_depth = walk(child, keys[index - 1] if index else low,
                                      keys[index] if index < n else high, depth + 1, False)
                if sub != counts[index]:
                    fail(f"{where}: child {index} holds {sub} items, the node says {counts[index]}")
                if leaf_depth is not None and sub_depth != leaf_depth:
                    fail(f"{where}: the tree is not balanced")
                leaf_depth = sub_depth
                total += sub
            return total, leaf_depth

        total, _ = walk(body, None, None, 0, True)
        if total != count:
            fail(f"{me} counts {count} items but its tree holds {total}")
        previous = 0
        for offset in leaves:
            node = self._ps_node(offset)
            if node.head64[3] != previous:
                fail(f"{me}: leaf {offset:#x} links back to {node.head64[3]:#x}, not {previous:#x}")
            if previous and self._ps_node(previous).head64[2] != offset:
                fail(f"{me}: leaf {previous:#x} does not link to {offset:#x}")
            previous = offset
        if self._ps_node(previous).head64[2]:
            fail(f"{me}: the last leaf links onwards")


def _group_sizes(total, fill, least):
    """Sizes of the groups ``total`` things are cut into: about ``fill`` each, at least ``least`` each
    when there are two groups or more (one group may be smaller: it is the root)."""
    groups = max(1, min(-(-total // fill), total // least))
    base, extra = divmod(total, groups)
    return [base + 1] * extra + [base] * (groups - extra)


def _zeros(view, count):
    return memoryview(array(view.format, bytes(F.CELL * count)))


abc.MutableMapping.register(PersistentSortedDict)

# Every method that changes a SortedDict is one change (see _types.change): done once, here.
for _name in ("__setitem__", "__delitem__", "popitem", "pop", "clear"):
    setattr(PersistentSortedDict, _name, T.change(PersistentSortedDict.__dict__[_name]))
del _name
