"""The child side of tests/test_interrupts.py (R7): a seeded workload hit by exceptions at random bytecodes.

Run as ``python tests/_interruptkit.py JSON`` with permastruct importable
(``_crashkit.child_env()``).  The child opens a ``_crashkit.CrashStorage``,
says ``ready`` on stdout, runs seeded random transactions on it (the same kinds
of change as the crash kit's ``Workload``: scalars, a List of ints, a Dict and
a List of shared ``Item`` structures, a SortedDict, a Set and a Buffer, big
values so that the file grows, whole collections dropped so that space is
freed) mirrored in the kit's ``Model``, while an *injector* raises an exception
inside the library:

* ``alarm``: ``signal.setitimer(ITIMER_REAL)`` fires after a random delay
  (log-uniform between ``low`` and ``high`` microseconds, re-armed), and the
  SIGALRM handler raises ``KeyboardInterrupt`` - wherever the interpreter is.
  Where that lands depends on timing: a rerun is similar, not identical.
* ``trace``: ``sys.settrace`` with ``f_trace_opcodes`` counts the opcodes
  executed in frames whose code lives in the permastruct package, and raises
  ``KeyboardInterrupt`` or ``MemoryError`` at a random count, or at the next
  opcode where CPython delivers a signal (a function's entry, a backward jump,
  a call and the instruction after it: ``conftest.deliverable``), as a real
  signal arriving at that count would be.  (A MemoryError is modelled the same
  way: the library's "one step" stores assume no exception between them.)
  Deterministic for a seed (the child runs with ``PYTHONHASHSEED=0``).

The injector is black-box: it knows the public API and the package's
directory, nothing else.  It is armed only while a library call of the
program is running (the ``scopes`` say which: ``mutation`` - creating objects
and changing collections, ``commit``, ``rollback``); the program's own code
(the model, the checks, the log) runs with it quiet.  After it fires it stays
quiet until the program's next call: one exception per call, so clean-up code
of the library (``except``/``finally``) runs to its end.

What the program does after an exception (what a program would):

* inside a mutation: at random ``commit()`` (keeping what the transaction did)
  or ``rollback()``;
* inside ``commit()``: at random ``commit()`` again or ``rollback()``;
* inside ``rollback()``, or out of ``with p.transaction()``: ``rollback()``.

Each of those may itself be interrupted; then it tries again (a new random
choice after a failed commit), and after a few interrupted attempts (0 to 4)
the next attempt runs with the injector quiet, so it gets through.

**The design answer** (DESIGN.md R7 and 3.8): a ``commit()`` that raised did
not return, so it counts as not done: from the moment it raised, the store
(on disk, and read through the live storage after ``rollback()``) must be at
the last commit that returned.  An engine that cannot know whether the
exception arrived before or after its commit became durable has to undo it.
Its changes stay pending: a retried ``commit()`` that returns must commit
exactly the transaction.  An exception inside a mutation leaves that mutation
done or not done, never half-done: a ``commit()`` after it must commit the
state before the mutation or after it (the program cannot know which), and
the engine may also refuse such a commit with an error, as long as
``rollback()`` then works.  Whether a call "returned" is decided at the
caller: ``result = fn(); injector.armed = False`` has no point between the
return and the store where CPython runs a signal handler, so an exception
the program sees came from inside the call.

What the child checks itself (and reports as a ``problem``, after which it
stops: it SIGKILLs itself, and the parent still checks the files):

* after every commit that returned: the live store equals the model (or one
  of the two candidates after an interrupted mutation), and ``check()``
  passes;
* after ``rollback()``: the live store equals the last returned commit, and
  ``check()`` passes;
* no library call raises anything but the injected exception, except that
  an injected exception may surface as another type (counted).

The log (``_crashkit.Recorder`` frames, written unbuffered) holds:
``("state", sid, json)`` once per distinct canonical state;
``("returned", k, sid)``; ``("inflight", k, [sid, ...])`` before each commit
(the states it may commit); ``("failed", k, where)`` when that commit raised;
``("interrupt", where, exception type, attempt)``; ``("rolledback", k)``;
``("snapshot", folder, sid, why)``: a copy of the store's files taken while the
library was between calls - exactly what a SIGKILL at that moment leaves -
that must open at the state ``sid``; ``("surfaced", type, text)``: an injected
exception that came out as another type; ``("swallowed", call)``: one that
never came out of the call (a finalizer or callback swallowed it: the call
went on); ``("problem", text)``;
``("end", ...)``.  At the end of its iterations (or when a problem stopped it)
the child SIGKILLs itself; the parent may have killed it before.
"""

import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import traceback
from array import array

import _crashkit as K
from conftest import deliverable, is_generated
import permastruct
from permastruct.errors import IncompleteChangeError
from permastruct.pages import PageFile

PACKAGE = os.path.dirname(os.path.abspath(permastruct.__file__)) + os.sep
INJECTED = (KeyboardInterrupt, MemoryError)


# == the injectors ===========================================================================
class AlarmInjector:
    """SIGALRM after a random delay; the handler raises KeyboardInterrupt while armed."""

    def __init__(self, rng, scopes, low_us=20, high_us=2000):
        self.rng, self.scopes = rng, frozenset(scopes)
        self.low, self.high = math.log(low_us * 1e-6), math.log(high_us * 1e-6)
        self.armed = False
        self.hot = False
        self.fired = 0
        signal.signal(signal.SIGALRM, self._handler)

    def _delay(self):
        return math.exp(self.rng.uniform(self.low, self.high))

    def heat(self, hot):
        """Whether the coming transaction is interrupted at all."""
        self.hot = hot
        if not hot:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def arm(self, scope):
        if self.hot and scope in self.scopes:
            self.armed = True
            if signal.getitimer(signal.ITIMER_REAL)[0] == 0.0:
                signal.setitimer(signal.ITIMER_REAL, self._delay())

    def disarm(self):
        self.armed = False

    def _handler(self, signum, frame):
        if self.armed:
            self.armed = False  # quiet until the next call: the timer is not re-armed here
            self.fired += 1
            raise KeyboardInterrupt
        if self.hot:  # it went off in the program's own code: keep the clock going
            signal.setitimer(signal.ITIMER_REAL, self._delay())


class TraceInjector:
    """Count opcodes executed in permastruct's frames; raise ``exception`` at a random count."""

    def __init__(self, rng, scopes, exception, low=1, high=20000):
        self.rng, self.scopes, self.exception = rng, frozenset(scopes), exception
        self.low, self.high = low, high
        self.armed = False
        self.hot = False
        self.fired = 0
        self.countdown = 0
        self.counted = 0      # opcodes counted in the current armed call
        self.longest = 0      # the most opcodes a call of a scope ran without firing

    def _draw(self):
        if self.high <= self.low:
            return self.low
        high = max(self.high, int(self.longest * 1.2))
        if self.rng.random() < 0.5:
            return self.rng.randint(self.low, high)
        return int(math.exp(self.rng.uniform(math.log(self.low), math.log(high))))

    def heat(self, hot):
        self.hot = hot
        if hot:
            self.countdown = self._draw()

    def arm(self, scope):
        if self.hot and scope in self.scopes:
            self.counted = 0
            self.armed = True
            sys.settrace(self._global)

    def disarm(self):
        if self.armed:
            self.longest = max(self.longest, self.counted)
        self.armed = False
        sys.settrace(None)

    def _global(self, frame, event, arg):
        name = frame.f_code.co_filename  # (the package's files, and the code it generates)
        if name.startswith(PACKAGE) or is_generated(name):
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self._local
        return None

    def _local(self, frame, event, arg):
        if event == "opcode" and self.armed:
            self.counted += 1
            self.countdown -= 1
            # (only where CPython delivers a signal: one that arrives elsewhere waits for the next
            # such instruction, see conftest.deliverable)
            if self.countdown <= 0 and deliverable(frame):
                self.armed = False
                self.fired += 1
                self.countdown = self._draw()
                raise self.exception()  # (CPython stops tracing when a trace function raises)
        return self._local


# == the program ===============================================================================
class Problem(Exception):
    """Something R7 forbids happened; the child logs it and stops."""


class Interrupted(Exception):
    """An injected exception came out of the program's call number ``attempt`` of ``where``."""


_TEXT = "abcdefghijklmnopqrstuvwxyz ABC0123456789_-äöüßéñ€→☃𝄞😀"


class Program:
    def __init__(self, args):
        self.args = args
        self.folder = args["dir"]
        self.path = os.path.join(self.folder, K.MAIN)
        seed = args["seed"]
        self.rng = random.Random(seed)
        irng = random.Random(f"inject:{seed}")
        mode, scopes = args["mode"], args.get("scopes", ("mutation", "commit", "rollback"))
        if mode == "alarm":
            self.inj = AlarmInjector(irng, scopes, args.get("low_us", 20), args.get("high_us", 2000))
        else:
            exception = {"KeyboardInterrupt": KeyboardInterrupt, "MemoryError": MemoryError}[args["exception"]]
            self.inj = TraceInjector(irng, scopes, exception, low=args.get("low_ops", 1),
                                     high=args.get("high_ops", 20000))
        self.hot_share = args.get("hot", 0.6)
        self.rec = K.Recorder(args["log"], self.folder, with_data=False)
        self.snapshots = args.get("snapshots", 6)
        self.snapshot_dir = args["snapshot_dir"]
        self.sids = {}
        self.k = 0
        self.interrupted_change = False
        self.pending = None

    # -- the log ---------------------------------------------------------------------
    def note(self, *event):
        self.rec.note(*event)

    def sid(self, state):
        sid = self.sids.get(state)
        if sid is None:
            sid = self.sids[state] = len(self.sids)
            self.note("state", sid, state)
        return sid

    def maybe_snapshot(self, why, chance=0.35):
        """Copy the store's files now (what a SIGKILL now leaves); they must open at the last returned commit."""
        if self.snapshots <= 0 or self.rng.random() >= chance:
            return
        self.snapshots -= 1
        target = os.path.join(self.snapshot_dir, f"snap{self.args['snapshots'] - self.snapshots}")
        shutil.copytree(self.folder, target)
        self.note("snapshot", target, self.sid(self.last), why)

    # -- calls into the library --------------------------------------------------------
    def call(self, fn, scope, model_fn=None):
        """``fn()`` with the injector armed; ``model_fn(model)`` mirrors it once it returned.

        An exception the injector caused comes out as :class:`Interrupted`
        (whatever its type when it left the library); any other goes on as it is.
        """
        inj = self.inj
        before = inj.fired
        self.pending = model_fn
        try:
            inj.arm(scope)
            result = fn()
            inj.armed = False  # no signal handler runs between fn's return and this store
        except BaseException as exc:
            # First, with no call before it (as after a return): fn raised something of its own (the
            # IncompleteChangeError of a refused commit) while armed, and a timer due now would
            # otherwise go off in the program's own next call (disarm) and escape the program.
            inj.armed = False
            inj.disarm()
            if inj.fired != before:
                raise Interrupted(exc) from exc
            raise
        finally:
            inj.disarm()
        if inj.fired != before:  # it fired, but the exception never came out (a finalizer swallowed it?)
            self.note("swallowed", self.what if scope == "mutation" else f"{fn.__name__}()")
        if model_fn is not None:
            model_fn(self.m)
        self.pending = None
        return result

    def attempt(self, fn, scope, armed, where):
        """One try of ``commit``/``rollback``: None when it returned, else the injected exception
        (or the IncompleteChangeError of a commit the engine refuses after a change it interrupted)."""
        try:
            if armed:
                self.call(fn, scope)
            else:
                fn()
        except Interrupted as exc:
            return self.injected(exc.args[0])
        except IncompleteChangeError as exc:
            if fn.__name__ != "commit" or not self.interrupted_change:
                raise Problem(f"{where}: {fn.__name__}() raised {_describe(exc)}, but no change had been "
                              "interrupted since the last commit or rollback") from exc
            self.note("refused", where)
            return exc
        except Exception as exc:
            raise Problem(f"{where}: {fn.__name__}() raised {_describe(exc)} (no exception was injected "
                          f"into this call)") from exc
        return None

    def injected(self, exc):
        self.interrupted_change = True  # until the next commit that returns or rollback
        if not isinstance(exc, INJECTED):
            self.note("surfaced", type(exc).__name__, _describe(exc))
        return exc

    # -- reading and checking the live store -------------------------------------------
    def live_state(self, when):
        try:
            return K.dumps(K.store_state(self.p))
        except Exception as exc:
            raise Problem(f"reading the live store {when} raised {_describe(exc)}") from exc

    def live_check(self, when):
        try:
            self.p.check()
        except Exception as exc:
            raise Problem(f"the live store's check() {when} raised {_describe(exc)}") from exc

    def returned(self, state, when):
        self.interrupted_change = False
        self.k += 1
        self.last = state
        self.committed = copy.deepcopy(self.m)
        self.note("returned", self.k, self.sid(state))
        self.live_check(f"after commit {self.k} returned ({when})")

    # -- the run -------------------------------------------------------------------------
    def run(self):
        rng = self.rng
        PageFile.checkpoint_bytes = self.args.get("checkpoint_bytes", 64 << 10)
        self.p = K.CrashStorage(self.path, fileSize=8192, stringRegistrySize=8,
                                pageSize=self.args.get("page_size", 4096))
        self.m = K.Model()
        self.committed = copy.deepcopy(self.m)
        self.last = K.DEFAULT_STATE
        self.note("returned", 0, self.sid(self.last))
        print("ready", flush=True)
        done = 0
        try:
            while done < self.args["iterations"]:
                style = rng.choices(("commit", "rollback", "with", "raise", "empty"), (55, 12, 18, 10, 5))[0]
                count = 0 if style == "empty" else rng.randint(1, 5)
                done += max(count, 1)
                self.inj.heat(rng.random() < self.hot_share)
                self.transaction(style, count)
            self.inj.heat(False)
            self.note("end", self.k, self.inj.fired)
        except Problem as exc:
            self.inj.heat(False)
            self.inj.disarm()
            self.note("problem", str(exc).replace(os.path.dirname(self.folder) + os.sep, ""))
        os.kill(os.getpid(), signal.SIGKILL)

    def transaction(self, style, count):
        if style in ("with", "raise"):
            return self.with_transaction(style, count)
        try:
            for _ in range(count):
                self.step()
        except Interrupted as exc:
            self.injected(exc.args[0])
            candidates = [self.m]
            if self.pending is not None:
                after = copy.deepcopy(self.m)
                self.pending(after)
                candidates.append(after)
            self.pending = None
            return self.recover(f"a mutation ({self.what})", candidates, ("commit", "rollback"))
        except Exception as exc:
            raise Problem(f"{self.what} raised {_describe(exc)} (no exception was injected)") from exc
        if style == "rollback":
            return self.recover_rollback("rollback()", first=True)
        self.note("inflight", self.k + 1, [self.sid(K.dumps(K.model_state(self.m)))])
        exc = self.attempt(self.p.commit, "commit", True, "commit")
        if exc is None:
            state = self.live_state(f"after commit {self.k + 1} returned")
            expected = K.dumps(K.model_state(self.m))
            if state != expected:
                self.note("returned", self.k + 1, self.sid(state))
                raise Problem(f"commit {self.k + 1} returned, but the live store differs from the model (not an "
                              f"interrupt's doing: this commit was not interrupted): "
                              f"{K.describe_diff(state, expected)}")
            return self.returned(state, "not interrupted")
        self.note("failed", self.k + 1, "commit")
        self.note("interrupt", "commit()", type(exc).__name__, 1)
        self.maybe_snapshot("right after an interrupted commit()", 0.5)
        return self.recover("commit()", [self.m], ("commit", "rollback"), noted=True)

    def with_transaction(self, style, count):
        before = self.inj.fired
        try:
            with self.p.transaction():
                for _ in range(count):
                    self.step()
                if style == "raise":
                    self.inj.arm("rollback")  # the rollback in transaction()'s exit may be interrupted
                    raise K.Boom()
                self.note("inflight", self.k + 1, [self.sid(K.dumps(K.model_state(self.m)))])
        except K.Boom:
            self.inj.armed = False  # first, with no call before it: no signal handler runs until here
            self.inj.disarm()
            self.m = copy.deepcopy(self.committed)
            state = self.live_state("after a with block rolled back")
            if state != self.last:
                raise Problem(f"with p.transaction() rolled back (an exception in its block), but the live store "
                              f"is not at the last returned commit {self.k}: {K.describe_diff(state, self.last)}")
            self.note("rolledback", self.k)
            return None
        except BaseException as exc:
            self.inj.armed = False
            self.inj.disarm()
            if isinstance(exc, Interrupted):
                exc = exc.args[0]
            elif self.inj.fired == before:
                if not isinstance(exc, Exception):
                    raise
                raise Problem(f"with p.transaction() ({self.what}) raised {_describe(exc)} (no exception was "
                              f"injected)") from exc
            self.injected(exc)
            self.pending = None
            where = f"with p.transaction() ({'its rollback' if style == 'raise' else self.what})"
            return self.recover_rollback(where, first=False)
        state = self.live_state(f"after with p.transaction() committed {self.k + 1}")
        expected = K.dumps(K.model_state(self.m))
        if state != expected:
            raise Problem(f"with p.transaction() committed, but the live store differs from the model (not "
                          f"interrupted): {K.describe_diff(state, expected)}")
        return self.returned(state, "with p.transaction()")

    # -- after an exception ------------------------------------------------------------
    def recover(self, where, candidates, actions, noted=False):
        """``commit()`` or ``rollback()`` until one returns; then check what the program sees."""
        rng = self.rng
        if not noted:
            self.note("interrupt", where, "-", 0)
            self.maybe_snapshot(f"right after an exception in {where}", 0.2)
        quiet_after = rng.randint(0, 4)
        action = rng.choice(actions)
        attempts = 0
        while True:
            if action == "rollback":
                return self.recover_rollback(where, first=False)
            armed = attempts < quiet_after
            attempts += 1
            sids = [self.sid(K.dumps(K.model_state(c))) for c in candidates]
            self.note("inflight", self.k + 1, sids)
            exc = self.attempt(self.p.commit, "commit", armed,
                               f"after an exception in {where}, commit() (attempt {attempts})")
            if exc is None:
                break
            self.note("failed", self.k + 1, f"commit() after {where}")
            if isinstance(exc, IncompleteChangeError):  # refused: a rollback is due
                action = "rollback"
                continue
            self.note("interrupt", f"commit() after {where}", type(exc).__name__, attempts)
            self.maybe_snapshot(f"right after an interrupted retry of commit() after {where}", 0.3)
            action = rng.choice(("commit", "rollback"))
        state = self.live_state(f"after commit() returned (after an exception in {where})")
        states = [K.dumps(K.model_state(c)) for c in candidates]
        if state not in states:
            self.note("returned", self.k + 1, self.sid(state))  # it did return: the files should hold it
            what = ("the state before the interrupted call nor the state after it" if len(states) == 2 else
                    "exactly the transaction's changes")
            raise Problem(f"after an exception in {where}, commit() returned (attempt {attempts}) but committed "
                          f"neither {what}: {K.describe_diff(state, states[-1])}"
                          + (f"; differences from the state before it: {K.describe_diff(state, states[0])}"
                             if len(states) == 2 else ""))
        self.m = candidates[states.index(state)]
        self.returned(state, f"after an exception in {where}")
        self.maybe_snapshot(f"after a commit that followed an exception in {where}", 0.2)
        return None

    def recover_rollback(self, where, first):
        """``rollback()`` until it returns; the live store must then be at the last returned commit.

        ``first``: a plain rollback of the program (not after an exception).
        """
        quiet_after = self.rng.randint(1, 3) if first else self.rng.randint(0, 4)
        attempts = 0
        plain = first
        while True:
            armed = attempts < quiet_after
            attempts += 1
            what = "rollback()" if plain else f"after an exception in {where}, rollback() (attempt {attempts})"
            exc = self.attempt(self.p.rollback, "rollback", armed, what)
            if exc is None:
                break
            self.note("interrupt", "rollback()" if plain else f"rollback() after {where}", type(exc).__name__,
                      attempts)
            if plain:
                where, plain = "rollback()", False
        self.m = copy.deepcopy(self.committed)
        self.interrupted_change = False
        when = "after rollback()" if plain else f"after rollback() (after an exception in {where})"
        state = self.live_state(when)
        if state != self.last:
            raise Problem(f"{when} the live store is not at the last returned commit {self.k}: "
                          f"{K.describe_diff(state, self.last)}")
        self.note("rolledback", self.k)
        if not plain:
            self.live_check(when)
            self.maybe_snapshot(f"after a rollback() that followed an exception in {where}", 0.25)
        return None

    # -- the steps: one library call each, mirrored once it returned -------------------------
    def step(self):
        name = self.rng.choices(("scalar", "numbers", "byname", "ranked", "items", "tags", "blob", "grow",
                                 "reset"), (14, 14, 16, 12, 12, 10, 8, 4, 4))[0]
        getattr(self, "op_" + name)()

    def text(self, longest=24):
        rng = self.rng
        n = rng.randint(0, longest) if rng.random() < 0.95 else rng.randint(300, 3000)
        return "".join(rng.choice(_TEXT) for _ in range(n))

    def mutate(self, what, fn, model_fn=None):
        self.what = what
        return self.call(fn, "mutation", model_fn)

    def root(self):
        return self.mutate("reading p.root", lambda: self.p.root)  # (the first access creates it)

    def new_item(self):
        rng = self.rng
        name = self.text(12) if rng.random() < 0.9 else None
        value = rng.randint(-2**63, 2**63 - 1)
        weight = rng.uniform(-1e6, 1e6)
        note = rng.randbytes(rng.randint(0, 40)) if rng.random() < 0.7 else None
        proxy = self.mutate("creating an Item",
                            lambda: self.p.schema.Item(name=name, value=value, weight=weight, note=note))
        return proxy, K.ItemM(name, value, weight, note)

    def ensure(self, name, make, model_value):
        if getattr(self.m, name) is None:
            self.mutate(f"setting root.{name} to a new collection", lambda: setattr(self.p.root, name, make()),
                        lambda m: setattr(m, name, copy.copy(model_value)))

    def op_scalar(self):
        rng = self.rng
        which = rng.randrange(4)
        if which == 0:
            value = rng.randint(-2**63, 2**63 - 1)
            field = "count"
        elif which == 1:
            value = rng.choice((rng.uniform(-1e9, 1e9), rng.random(), 0.0, -2.5e-300))
            field = "ratio"
        elif which == 2:
            value = self.text() if rng.random() < 0.85 else None
            field = "title"
        else:
            value = rng.randbytes(rng.randint(0, 60)) if rng.random() < 0.85 else None
            field = "tag"
        root = self.root()
        self.mutate(f"setting root.{field}", lambda: setattr(root, field, value),
                    lambda m: setattr(m, field, value))

    def op_numbers(self):
        rng = self.rng
        self.ensure("numbers", list, [])
        n = len(self.m.numbers)
        which = rng.randrange(6)
        value = rng.randint(-2**63, 2**63 - 1)
        numbers = lambda: self.p.root.numbers  # noqa: E731 - read anew inside each call
        if which == 0 or n == 0:
            self.mutate("List.append", lambda: numbers().append(value), lambda m: m.numbers.append(value))
        elif which == 1:
            values = [rng.randint(-1000, 1000) for _ in range(rng.randint(1, 40))]
            self.mutate(f"List.extend of {len(values)}", lambda: numbers().extend(values),
                        lambda m: m.numbers.extend(values))
        elif which == 2:
            index = rng.randrange(n)
            self.mutate("List.__setitem__", lambda: numbers().__setitem__(index, value),
                        lambda m: m.numbers.__setitem__(index, value))
        elif which == 3:
            index = rng.randint(0, n)
            self.mutate("List.insert", lambda: numbers().insert(index, value),
                        lambda m: m.numbers.insert(index, value))
        elif which == 4:
            self.mutate("List.pop", lambda: numbers().pop(), lambda m: m.numbers.pop())
        else:
            a = rng.randint(0, n)
            b = rng.randint(a, min(n, a + 50))
            self.mutate(f"del List[{a}:{b}]", lambda: numbers().__delitem__(slice(a, b)),
                        lambda m: m.numbers.__delitem__(slice(a, b)))

    def op_byname(self):
        rng = self.rng
        self.ensure("byname", dict, {})
        which = rng.randrange(5)
        byname = lambda: self.p.root.byname  # noqa: E731
        if which <= 1 or not self.m.byname:
            key = f"k{rng.randrange(60)}" if rng.random() < 0.8 else self.text(10)
            proxy, model = self.new_item()
            self.mutate("Dict.__setitem__", lambda: byname().__setitem__(key, proxy),
                        lambda m: m.byname.__setitem__(key, model))
        elif which == 2:
            key = rng.choice(list(self.m.byname))
            self.modify(lambda: byname()[key], lambda m: m.byname[key])
        elif which == 3:
            key = rng.choice(list(self.m.byname))
            self.mutate("del Dict[key]", lambda: byname().__delitem__(key), lambda m: m.byname.__delitem__(key))
        else:  # several keys in one call
            pairs = [(f"u{rng.randrange(40)}", self.new_item()) for _ in range(rng.randint(2, 6))]
            self.mutate(f"Dict.update of {len(pairs)}", lambda: byname().update({k: p for k, (p, _) in pairs}),
                        lambda m: m.byname.update({k: model for k, (_, model) in pairs}))

    def modify(self, proxy_of, model_of):
        rng = self.rng
        which = rng.randrange(4)
        if which == 0:
            field, value = "value", rng.randint(-2**63, 2**63 - 1)
        elif which == 1:
            field, value = "weight", rng.uniform(-1e3, 1e3)
        elif which == 2:
            field, value = "name", self.text(12) if rng.random() < 0.9 else None
        else:
            field, value = "note", rng.randbytes(rng.randint(0, 40)) if rng.random() < 0.8 else None
        self.mutate(f"setting Item.{field}", lambda: setattr(proxy_of(), field, value),
                    lambda m: setattr(model_of(m), field, value))

    def op_ranked(self):
        rng = self.rng
        self.ensure("ranked", lambda: self.p.schema.Ranked(), {})
        which = rng.randrange(5)
        ranked = lambda: self.p.root.ranked  # noqa: E731
        if which <= 1 or not self.m.ranked:
            for _ in range(rng.randint(1, 8)):
                key, value = rng.randrange(-5000, 5000), rng.randbytes(rng.randint(0, 24))
                self.mutate("SortedDict.__setitem__", lambda: ranked().__setitem__(key, value),
                            lambda m: m.ranked.__setitem__(key, value))
        elif which == 2:
            key = rng.choice(sorted(self.m.ranked))
            self.mutate("del SortedDict[key]", lambda: ranked().__delitem__(key),
                        lambda m: m.ranked.__delitem__(key))
        elif which == 3:
            pairs = {rng.randrange(-5000, 5000): rng.randbytes(rng.randint(0, 24)) for _ in range(rng.randint(2, 40))}
            self.mutate(f"SortedDict.update of {len(pairs)}", lambda: ranked().update(pairs),
                        lambda m: m.ranked.update(pairs))
        else:
            low = rng.randrange(-5000, 5000)
            for key in [k for k in sorted(self.m.ranked) if low <= k < low + rng.randint(10, 800)]:
                self.mutate("del SortedDict[key] (a range)", lambda key=key: ranked().__delitem__(key),
                            lambda m, key=key: m.ranked.__delitem__(key))

    def op_items(self):
        rng = self.rng
        self.ensure("items", list, [])
        which = rng.randrange(6)
        items = lambda: self.p.root.items  # noqa: E731
        n = len(self.m.items)
        if which == 5:  # many at once
            rows = [(self.text(12) if rng.random() < 0.9 else None, rng.randint(-2**63, 2**63 - 1),
                     rng.uniform(-1e6, 1e6), rng.randbytes(rng.randint(0, 40)) if rng.random() < 0.7 else None)
                    for _ in range(rng.randint(1, 300))]
            self.mutate("List.extend_records of Items", lambda: items().extend_records(rows),
                        lambda m: m.items.extend(K.ItemM(*row) for row in rows))
        elif which == 0 or not n:
            proxy, model = self.new_item()
            self.mutate("List.append of an Item", lambda: items().append(proxy), lambda m: m.items.append(model))
        elif which == 1 and self.m.byname:  # share an item with the dict
            key = rng.choice(list(self.m.byname))
            self.mutate("List.append of a shared Item", lambda: items().append(self.p.root.byname[key]),
                        lambda m: m.items.append(m.byname[key]))
        elif which == 2:
            index = rng.randrange(n)
            self.modify(lambda: items()[index], lambda m: m.items[index])
        elif which == 3:
            index = rng.randrange(n)
            self.mutate("del List[index] of Items", lambda: items().__delitem__(index),
                        lambda m: m.items.__delitem__(index))
        else:
            index = rng.randrange(n)
            self.mutate("List.insert(0, an Item of the list)", lambda: items().insert(0, items()[index]),
                        lambda m: m.items.insert(0, m.items[index]))

    def op_tags(self):
        rng = self.rng
        self.ensure("tags", lambda: self.p.schema.Tags(), {})
        which = rng.randrange(5)
        tags = lambda: self.p.root.tags  # noqa: E731
        word = f"t{rng.randrange(80)}" if rng.random() < 0.85 else self.text(8)
        if which <= 1 or not self.m.tags:
            self.mutate("Set.add", lambda: tags().add(word), lambda m: m.tags.setdefault(word, None))
        elif which == 2:
            word = rng.choice(list(self.m.tags)) if rng.random() < 0.8 else word
            self.mutate("Set.discard", lambda: tags().discard(word), lambda m: m.tags.pop(word, None))
        elif which == 3:
            words = [f"t{rng.randrange(80)}" for _ in range(rng.randint(2, 12))]
            self.mutate(f"Set.update of {len(words)}", lambda: tags().update(words),
                        lambda m: [m.tags.setdefault(w, None) for w in words])
        else:
            self.mutate("Set.pop", lambda: tags().pop(), lambda m: m.tags.popitem())

    def op_blob(self):
        rng = self.rng
        which = rng.randrange(4)
        if which == 0 or (which == 1 and self.m.blob is None):
            self.new_blob(rng.randint(0, 3000))
        elif which == 1 and len(self.m.blob.data):
            n = len(self.m.blob.data)
            a = rng.randrange(n)
            b = rng.randint(a, min(n, a + rng.choice((16, 600, 9000))))
            data = rng.randbytes(b - a)

            def write():
                with memoryview(self.p.root.blob) as view:
                    with view.cast("B") as flat:
                        flat[a:b] = data
            self.mutate("writing into a Buffer", write, lambda m: m.blob.data.__setitem__(slice(a, b), data))
        else:
            self.mutate("setting root.blob to None", lambda: setattr(self.p.root, "blob", None),
                        lambda m: setattr(m, "blob", None))

    def new_blob(self, nbytes):
        rng = self.rng
        kind = rng.randrange(3)
        if kind == 0:
            source = rng.randbytes(nbytes)
        elif kind == 1:
            source = array("d", (rng.uniform(-1, 1) for _ in range(nbytes // 8)))
        else:
            columns = rng.randint(1, 8)
            rows = max(1, nbytes // (4 * columns))
            source = memoryview(bytearray(rng.randbytes(rows * columns * 4))).cast("B").cast("i", (rows, columns))
        view = memoryview(source)
        blob = K.BlobM(view.tobytes(), view.format, view.shape)
        self.mutate(f"setting root.blob to a Buffer of {view.nbytes} bytes",
                    lambda: setattr(self.p.root, "blob", source), lambda m: setattr(m, "blob", copy.deepcopy(blob)))

    def op_grow(self):
        rng = self.rng
        which = rng.randrange(4)
        if which == 0:
            self.new_blob(rng.randint(20_000, 200_000))
        elif which == 1:
            self.ensure("numbers", list, [])
            values = [rng.randint(-2**63, 2**63 - 1) for _ in range(rng.randint(300, 2000))]
            self.mutate(f"List.extend of {len(values)}", lambda: self.p.root.numbers.extend(values),
                        lambda m: m.numbers.extend(values))
        elif which == 2:
            self.ensure("ranked", lambda: self.p.schema.Ranked(), {})
            pairs = {rng.randrange(-5000, 5000): rng.randbytes(rng.randint(0, 24)) for _ in range(rng.randint(100, 400))}
            self.mutate(f"SortedDict.update of {len(pairs)}", lambda: self.p.root.ranked.update(pairs),
                        lambda m: m.ranked.update(pairs))
        else:
            self.ensure("items", list, [])
            for _ in range(rng.randint(10, 40)):
                proxy, model = self.new_item()
                self.mutate("List.append of an Item", lambda proxy=proxy: self.p.root.items.append(proxy),
                            lambda m, model=model: m.items.append(model))

    def op_reset(self):
        """Drop a whole collection (its space is freed at commit), sometimes for a new, empty one."""
        rng = self.rng
        name = rng.choice(("numbers", "byname", "ranked", "items", "tags"))
        self.mutate(f"setting root.{name} to None", lambda: setattr(self.p.root, name, None),
                    lambda m: setattr(m, name, None))


def _describe(exc):
    frames = traceback.extract_tb(exc.__traceback__)
    inner = [f for f in frames if f.filename.startswith(PACKAGE)] or frames
    at = f" at {os.path.relpath(inner[-1].filename, PACKAGE)}:{inner[-1].lineno}" if inner else ""
    return f"{type(exc).__name__}: {exc}{at}"


if __name__ == "__main__":
    Program(json.loads(sys.argv[1])).run()
