"""Views of the buffer protocol (memoryview, numpy arrays) of objects that a rollback, a savepoint's
rollback or an undo takes back: they never write into another object (``Heap.quarantine``)."""

import array
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import views_storage
from permastruct import Storage, UndoError
from permastruct.errors import DeadProxyError, IncompleteChangeError


Views = views_storage()


def _fill(view, value):
    view[:] = array.array("q", [value] * len(view))


def _store(tmp_path, **options):
    p = Views(str(tmp_path / "v.ps"), **options)
    p.root.other = list(range(1000, 1010))
    p.commit()
    return p


def _same_class_filler(p, count=2000):
    """Objects that take every free place of the common small size classes (what would overwrite a
    place given back to the allocator)."""
    return [p.schema.Buffer(array.array("q", [n] * (n % 40 + 1))) for n in range(count)]


def test_a_buffers_view_after_a_rollback_writes_only_into_its_quarantined_place(tmp_path):
    with _store(tmp_path) as p:
        buf = p.schema.Buffer(array.array("q", range(100)))
        place = buf._ps_oid
        view = memoryview(buf)
        p.rollback()
        with pytest.raises(DeadProxyError):
            len(buf)
        assert view.tolist() == list(range(100))  # (it shows what it showed)
        p.check()
        p.root.ints = list(range(100))  # (the size the buffer had: its place would come first)
        assert p.root.ints._ps_body != place
        fillers = _same_class_filler(p)
        assert place not in {f._ps_oid for f in fillers}
        p.commit()
        p.check()
        _fill(view, -7)
        p.commit()
        p.check()
        assert list(p.root.ints) == list(range(100)) and list(p.root.other) == list(range(1000, 1010))
        assert all(list(memoryview(f).cast("B").cast("q")) == [n] * (n % 40 + 1) for n, f in enumerate(fillers))


def test_the_place_is_freed_by_the_first_commit_after_the_view_goes_and_reused(tmp_path):
    with _store(tmp_path) as p:
        buf = p.schema.Buffer(array.array("q", range(100)))
        place = buf._ps_oid
        view = memoryview(buf)
        p.rollback()
        p.commit()  # (recorded as held)
        p.check()
        assert place in p._heap.held_objects()
        view.release()
        assert place in p._heap.quarantine  # (the program still holds its dead proxy: it may be a
        del buf  # numpy.frombuffer's base, which keeps using the memory after it let go of the view)
        p.commit()  # frees it
        p.check()
        assert place not in p._heap.held_objects() and not p._heap.quarantine
        again = p.schema.Buffer(array.array("q", range(100)))
        assert again._ps_oid == place  # reused normally
        p.root.buf = again
        p.commit()
        p.check()


def test_a_view_of_a_new_lists_cells_after_a_rollback(tmp_path):
    with _store(tmp_path) as p:
        ints = p.schema.Ints(range(50))
        view = memoryview(ints)
        p.rollback()
        p.check()
        p.root.ints = list(range(50))
        p.commit()
        _fill(view, -1)
        p.commit()
        p.check()
        assert list(p.root.ints) == list(range(50))
        del view, ints
        p.commit()
        p.check()
        assert not p._heap.quarantine


def test_a_view_of_the_array_a_rolled_back_extend_made_keeps_the_committed_list_whole(tmp_path):
    with _store(tmp_path) as p:
        p.root.ints = [1, 2, 3]
        p.commit()
        p.root.ints.extend(range(200))  # a new array; the committed one is freed in the transaction
        view = memoryview(p.root.ints)
        p.rollback()
        assert list(p.root.ints) == [1, 2, 3]
        p.check()
        p.root.other.extend(range(200))  # (the size of the taken-back array)
        p.commit()
        _fill(view, -3)
        p.commit()
        p.check()
        assert list(p.root.ints) == [1, 2, 3]
        assert list(p.root.other) == list(range(1000, 1010)) + list(range(200))


def test_a_view_of_a_committed_lists_cells_still_shows_them_after_a_rollback(tmp_path):
    with _store(tmp_path) as p:
        p.root.ints = list(range(20))
        p.commit()
        view = memoryview(p.root.ints)
        view[0] = 99
        p.rollback()
        assert not p._heap.quarantine  # (nothing was taken back)
        assert view[0] == 0 and p.root.ints[0] == 0
        view[1] = 77
        assert p.root.ints[1] == 77
        p.commit()
        p.check()


def test_a_strings_view_after_a_rollback(tmp_path):
    with _store(tmp_path) as p:
        raw = p.schema.ByteString(b"rolled back " * 20)
        view = memoryview(raw)
        p.rollback()
        p.check()
        strings = [p.schema.ByteString(b"x" * n) for n in range(300)]
        p.root.raw = strings[-1]
        p.commit()
        assert view.tobytes() == b"rolled back " * 20 and view.readonly
        p.check()
        assert all(bytes(s) == b"x" * n for n, s in enumerate(strings))


def test_a_savepoints_rollback_quarantines_what_the_inner_block_made(tmp_path):
    with _store(tmp_path) as p:
        with p.transaction():
            p.root.ints = [5, 6, 7]
            views = []
            with pytest.raises(ValueError):
                with p.transaction():
                    views.append(memoryview(p.schema.Buffer(array.array("q", range(30)))))
                    p.root.ints.extend(range(100))
                    views.append(memoryview(p.root.ints))
                    raise ValueError("the inner block fails")
            assert list(p.root.ints) == [5, 6, 7]
            assert len(p._heap.quarantine) == 2
            p.root.other = list(range(130))
            fillers = _same_class_filler(p, 500)
        p.check()
        for view in views:
            _fill(view, -9)
        p.commit()
        p.check()
        assert list(p.root.ints) == [5, 6, 7] and list(p.root.other) == list(range(130))
        assert all(list(memoryview(f).cast("B").cast("q")) == [n] * (n % 40 + 1) for n, f in enumerate(fillers))
        del view, fillers
        views.clear()
        p.commit()
        p.check()
        assert not p._heap.quarantine and not p._heap.held_objects()


def test_a_quarantine_not_yet_committed_survives_another_rollback(tmp_path):
    with _store(tmp_path) as p:
        view = memoryview(p.schema.Buffer(array.array("q", range(64))))
        p.rollback()
        p.rollback()  # (takes the claim back too: claimed again)
        p.check()
        with p.transaction():
            try:
                with p.transaction():
                    p.root.ints = list(range(64))
                    raise KeyError
            except KeyError:
                pass
        p.rollback()
        p.check()
        fillers = _same_class_filler(p, 300)
        p.commit()
        _fill(view, 4)
        p.commit()
        p.check()
        assert all(list(memoryview(f).cast("B").cast("q")) == [n] * (n % 40 + 1) for n, f in enumerate(fillers))


def test_a_large_buffer_in_a_page_run(tmp_path):
    with _store(tmp_path) as p:
        view = memoryview(p.schema.Buffer(bytes(range(256)) * 200))  # 50 KB: a run of pages
        p.rollback()
        p.check()
        blobs = [p.schema.Buffer(bytes([n]) * 51200) for n in range(4)]
        p.root.buf = blobs[0]
        p.commit()
        view[:] = b"\xee" * len(view)
        p.commit()
        p.check()
        assert all(bytes(b) == bytes([n]) * 51200 for n, b in enumerate(blobs))
        view.release()
        p.commit()
        p.check()


def test_numpy_arrays_of_taken_back_objects(tmp_path):
    numpy = pytest.importorskip("numpy")
    with _store(tmp_path) as p:
        cells = numpy.asarray(p.schema.Ints(range(40)))
        data = numpy.frombuffer(p.schema.Buffer(array.array("q", range(40))), dtype="<i8")
        p.rollback()
        p.check()
        p.root.ints = list(range(40))
        fillers = _same_class_filler(p, 300)
        p.commit()
        cells[:] = -5
        if data.flags.writeable:
            data[:] = -6
        p.commit()
        p.check()
        assert list(p.root.ints) == list(range(40))
        assert all(list(memoryview(f).cast("B").cast("q")) == [n] * (n % 40 + 1) for n, f in enumerate(fillers))
        del cells, data
        p.commit()
        p.check()
        assert not p._heap.quarantine


def test_undo_refuses_while_a_view_shows_what_it_takes_back(tmp_path):
    with _store(tmp_path, history=5) as p:
        p.root.buf = p.schema.Buffer(array.array("q", range(10)))
        p.commit()
        made = p.last_transaction
        view = memoryview(p.root.buf)
        with pytest.raises(UndoError, match="memoryview"):
            p.undo(made)
        p.check()
        assert view.tolist() == list(range(10)) and p.root.buf is not None
        view.release()
        p.undo(made)
        assert p.root.buf is None
        p.check()


def test_undo_is_not_refused_by_a_view_of_what_it_keeps(tmp_path):
    with _store(tmp_path, history=5) as p:
        p.root.ints = list(range(10))
        p.commit()
        view = memoryview(p.root.ints)
        p.root.other = [1]
        p.commit()
        p.undo(p.last_transaction)
        assert list(p.root.other) == list(range(1000, 1010))
        view[0] = 42
        assert p.root.ints[0] == 42
        p.commit()
        p.check()


def _reused_place(p):
    """A view of a Buffer made in the place of the committed array a growing List freed in the
    same transaction: after the rollback that array is back where the view points."""
    p.root.ints = [1, 2, 3]
    p.commit()
    old = p.root.ints._ps_body
    p.root.ints.extend(range(10))  # the committed array is freed in the transaction...
    buf = p.schema.Buffer(array.array("q", range(6)))  # ...and its place is the next of its size
    assert buf._ps_oid == old
    return memoryview(buf), old


def test_what_the_restored_state_has_in_a_views_place_moves_away(tmp_path):
    with _store(tmp_path) as p:
        view, old = _reused_place(p)
        p.rollback()
        assert list(p.root.ints) == [1, 2, 3] and p.root.ints._ps_body != old  # (moved)
        assert old in p._heap.quarantine
        p.check()
        view[:] = array.array("q", [-1] * 6)
        assert list(p.root.ints) == [1, 2, 3] and view.tolist() == [-1] * 6
        p.commit()
        p.check()
        p.root.ints.append(4)
        p.commit()
        p.check()
        assert list(p.root.ints) == [1, 2, 3, 4]


def test_a_tree_node_and_a_hash_table_in_a_views_place_move_away(tmp_path):
    from permastruct import Dict, SortedDict

    class Trees(Storage):
        def populateSchema(self):
            s = self.schema
            Index = self.define(SortedDict("Index")[s.Int, s.Int])
            Table = self.define(Dict("Table")[s.String, s.Int])

            class Root(s.Structure):
                index = Index
                table = Table

    with Trees(str(tmp_path / "t.ps")) as p:
        p.root.index = {n: n for n in range(300)}
        p.root.table = {str(n): n for n in range(20)}
        p.commit()
        views = []
        for n in range(300, 2000):  # splits and grows free nodes and tables as it goes
            p.root.index[n] = n
            if n % 7 == 0:
                p.root.table[str(n)] = n
            views.append(memoryview(p.schema.Buffer(array.array("q", range(n % 50 + 1)))))
        relocations = p._heap.relocations
        p.rollback()
        assert p._heap.relocations > relocations  # (some views' places had to be emptied)
        assert len(p._heap.quarantine) == len(views) and not p._heap.poisoned
        p.check()
        assert dict(p.root.index) == {n: n for n in range(300)}
        assert dict(p.root.table) == {str(n): n for n in range(20)}
        for view in views:
            view[:] = array.array("q", [-2] * len(view))
        p.root.index[5000] = 1
        p.commit()
        p.check()
        assert dict(p.root.index) == {**{n: n for n in range(300)}, 5000: 1}
        assert dict(p.root.table) == {str(n): n for n in range(20)}
        del view
        views.clear()
        p.commit()
        p.check()
        assert not p._heap.quarantine


def test_a_view_over_a_place_that_cannot_be_emptied_refuses_commits_until_a_rollback(tmp_path, monkeypatch):
    from permastruct import _pack
    monkeypatch.setattr(_pack, "evacuate", lambda storage, places: False)  # (as when it is pinned)
    with _store(tmp_path) as p:
        view, old = _reused_place(p)
        p.rollback()  # the committed array is back where the view points
        assert list(p.root.ints) == [1, 2, 3] and p.root.ints._ps_body == old
        view[0] = -1  # (into the committed array: the store refuses to commit it)
        with pytest.raises(IncompleteChangeError, match="memoryview"):
            p.commit()
        with pytest.raises(IncompleteChangeError, match="memoryview"):
            p.undo(1)
        view.release()
        with pytest.raises(IncompleteChangeError, match="rollback"):
            p.commit()
        p.rollback()
        assert list(p.root.ints) == [1, 2, 3]
        p.root.other = [7]
        p.commit()
        p.check()
        assert list(p.root.ints) == [1, 2, 3]


def test_close_with_such_a_view_does_not_commit(tmp_path, monkeypatch):
    from permastruct import _pack
    monkeypatch.setattr(_pack, "evacuate", lambda storage, places: False)
    p = _store(tmp_path)
    view, _ = _reused_place(p)
    p.rollback()
    p.root.other = [8]
    with pytest.raises(IncompleteChangeError, match="memoryview"):
        p.close()
    del view
    with Views(str(tmp_path / "v.ps")) as p:
        assert list(p.root.ints) == [1, 2, 3] and list(p.root.other) == list(range(1000, 1010))
        p.check()


def test_pack_and_reopen_with_a_quarantined_place(tmp_path):
    with _store(tmp_path) as p:
        view = memoryview(p.schema.Buffer(array.array("q", range(500))))
        p.rollback()
        p.root.ints = list(range(3000))
        p.commit()
        p.root.ints = None
        p.commit()
        p.pack()
        p.check()
        view[:] = array.array("q", [3] * 500)
        p.root.other = list(range(500))
        p.commit()
        p.check()
        assert list(p.root.other) == list(range(500))
    # the close freed it (the view reaches no file afterwards)
    with Views(str(tmp_path / "v.ps")) as p:
        p.check()
        assert not p._heap.held_objects()
    view.release()


def test_a_process_killed_while_a_place_is_quarantined_leaves_a_store_that_checks(tmp_path):
    path = str(tmp_path / "v.ps")
    _store(tmp_path).close()
    script = textwrap.dedent(f"""
        import array, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_views import Views
        p = Views({path!r})
        views = [memoryview(p.schema.Buffer(array.array("q", range(n)))) for n in (10, 100, 10000)]
        views.append(memoryview(p.schema.Ints(range(30))))
        p.rollback()
        p.root.other = [1, 2]
        p.commit()
        assert len(p._heap.held_objects()) == 4
        p.root.other = [3]
        os.kill(os.getpid(), 9)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    with Views(path) as p:
        assert list(p.root.other) == [1, 2]
        p.check()
        p.commit()
        p.check()
        assert not p._heap.held_objects()


def test_memory_and_overlay_stores(tmp_path):
    for p in (Views(None), _store(tmp_path)):
        if p.fileName:
            p.close()
            p = Views(p.fileName, overlay=True)
        with p:
            view = memoryview(p.schema.Buffer(array.array("q", range(100))))
            p.rollback()
            p.root.ints = list(range(100))
            p.commit()
            _fill(view, 1)
            p.commit()
            p.check()
            assert list(p.root.ints) == list(range(100))


def test_an_evacuation_that_fails_poisons_instead(tmp_path, monkeypatch):
    from permastruct import _pack
    from permastruct.errors import StorageFullError

    def full(storage, places):
        storage._heap.allocator.alloc(100)  # (half done: something allocated, nothing rewritten)
        raise StorageFullError("no room")
    monkeypatch.setattr(_pack, "evacuate", full)
    with _store(tmp_path) as p:
        view, _ = _reused_place(p)
        p.rollback()  # (never raises)
        with pytest.raises(IncompleteChangeError, match="memoryview"):
            p.commit()
        del view
        monkeypatch.undo()
        p.rollback()
        p.root.other = [5]
        p.commit()
        p.check()
        assert list(p.root.ints) == [1, 2, 3] and list(p.root.other) == [5]


@pytest.mark.parametrize("evacuating", [False, True])
def test_a_rollback_cut_short_anywhere_then_retried_still_quarantines(tmp_path, evacuating):
    """A KeyboardInterrupt at any bytecode of a rollback that quarantines (and moves what is in the
    way): the retried rollback leaves the store at its last commit, the view's place out of
    every other object's way, and check() passing."""
    from conftest import _long_run, interrupt_at_opcode
    p = None
    # (every 53rd bytecode; the moving variant every 197th unless PERMASTRUCT_STRESS=1: 800 steps)
    step, fired, stride = 0, True, 197 if evacuating and not _long_run() else 53
    try:
        while fired and step < 3000:
            step += 1
            if p is None or evacuating:  # (a new store: the array's place comes next, see _reused_place)
                if p is not None:
                    p.close()
                p = Views(None)
                p.root.other = list(range(1000, 1010))
                p.commit()
                if not evacuating:
                    p.root.ints = [1, 2, 3]
                    p.commit()
            if evacuating:
                view, _ = _reused_place(p)
            else:
                view = memoryview(p.schema.Buffer(array.array("q", range(step % 40 + 1))))
                p.root.other.append(step)
            fired_now = interrupt_at_opcode(step * stride)
            try:
                p.rollback()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            fired = fired_now()
            p.rollback()
            p.check()
            assert list(p.root.ints) == [1, 2, 3], f"step {step}"
            assert not p._heap.poisoned, f"step {step}"
            fillers = _same_class_filler(p, 120)
            p.commit()
            view[:] = array.array("q", [-4] * len(view))
            p.commit()
            p.check()
            assert list(p.root.ints) == [1, 2, 3], f"step {step}"
            assert all(list(memoryview(f).cast("B").cast("q")) == [n] * (n % 40 + 1)
                       for n, f in enumerate(fillers)), f"step {step}"
            del fillers, view
            p.commit()
            p.check()
            assert not p._heap.quarantine, f"step {step}"
        assert 5 < step < 3000
    finally:
        if p is not None:
            p.close()
