"""R7: an exception at a random bytecode inside the library, then retry or rollback, then a crash.

DESIGN.md 8, R7: after a ``KeyboardInterrupt`` (from a signal) or a
``MemoryError`` inside ``commit()``, a checkpoint or a collection mutation, a
program retries or rolls back, and then the process dies: the store reopens at
exactly the last commit that *returned*, ``check()`` passes, and a half-done
mutation never becomes durable.

**Design answer - a commit() that raised.**  It did not return, so it counts as
not done: from the moment it raised, the store must be at the last returned
commit - in the files (what a SIGKILL then leaves), and as the program reads
it through the live storage after ``rollback()``.  An engine that cannot know
whether the exception arrived before or after its commit became durable has
to undo that commit before the exception leaves ``commit()``.  The
transaction's changes stay pending: a retried ``commit()`` that returns commits
exactly them.  After an exception inside a mutation the program cannot know
whether the mutation happened: a later ``commit()`` must commit the state
before it or after it, never a part of it (or refuse with an error, after
which ``rollback()`` must work).

The child program (``tests/_interruptkit.py``: its docstring has the details)
runs a seeded workload on ``_crashkit.CrashStorage`` (a List of ints, a Dict and
a List of shared structures, a SortedDict, a Set, a Buffer, scalars) with
checkpoints every 64 KiB of log, mirrored in the kit's model, while an
injector raises exceptions inside the library's calls.  After each exception
the program retries ``commit()`` or calls ``rollback()`` (each of which may be
interrupted again; after 0-4 interrupted tries one runs undisturbed).  It
checks what it sees itself (the live store equals the model after every
commit that returned, ``check()`` passes, ``rollback()`` leaves the last
returned commit, no call raises what was not injected) and logs every
returned commit, every commit in flight and every commit that raised, and
copies the store's files at random quiet moments (right after an interrupted
commit, say): a copy is exactly what a SIGKILL at that moment leaves.  In the
timer test the parent SIGKILLs it at a random moment half the time; else it
SIGKILLs itself at its end, or right after a problem.  The parent then opens
each copy and the store itself - with
``CrashStorage``, every third one with the bare ``permastruct.Storage`` - runs
``check()`` and wants exactly the last returned commit (or, when the kill came
during a commit, that commit's state).

The tests, one child per seed:

* ``test_keyboard_interrupts_from_a_timer``: SIGALRM after random delays of
  20-2000 us, its handler raising ``KeyboardInterrupt``, in mutations,
  commits (checkpoints included) and rollbacks.  Where it lands depends on
  timing: a rerun of a seed is similar, not identical - run it a few times,
  or find the same failure with the deterministic test below.
* ``test_keyboard_interrupts_at_random_opcodes``: the same, but a trace
  function (``sys.settrace``, ``f_trace_opcodes``) raises it after a random
  number of opcodes executed in the permastruct package: deterministic.
* ``test_memory_errors_inside_commit``: ``MemoryError`` at a random opcode
  inside ``commit()`` only.
* ``test_keyboard_interrupts_inside_rollback``: ``KeyboardInterrupt`` at a
  random opcode inside ``rollback()`` only.

Two more check the harness itself: with the injector never armed nothing is
found, and with the exception raised at the *first* opcode of every call (so
that nothing inside the library has happened) every rule holds whatever the
engine does - the program's retries, candidate states and the parent's checks
are exercised without the engine being disturbed.

The trace injector is stricter than a signal: CPython runs a signal handler
only at some instructions (calls, backward jumps), the trace function can
raise at any opcode, the ``return`` of a function included.  An engine that
wants to undo work an exception interrupted must cover its return with the
``try`` too.

The injectors are black-box: they know the public API and the package's
folder, nothing of the engine.  Failures name the seed and the child's
problem or the copy's or store's state, and give a rerun command;
``--seed``, ``--iterations`` and ``PERMASTRUCT_STRESS=1`` (more seeds, longer
runs) as everywhere::

    PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_interrupts.py -s
    PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_interrupts.py -s --seed 7 --iterations 600
    PERMASTRUCT_STRESS=1 PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_interrupts.py -s
"""

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

import _crashkit as K
from conftest import _long_run, scratch_folder

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_interruptkit.py")
LONG = _long_run()
#: Seeds of each test (the seed of the MemoryError test and of the opcode one are offset, so that
#: the workloads differ from the timer test's).
ALARM_SEEDS = range(100) if LONG else range(20)
OPCODE_SEEDS = range(1000, 1030) if LONG else range(1000, 1005)
MEMORY_SEEDS = range(2000, 2030) if LONG else range(2000, 2005)
ENTRY_SEEDS = range(3000, 3010) if LONG else range(3000, 3002)
ROLLBACK_SEEDS = range(4000, 4030) if LONG else range(4000, 4003)
ITERATIONS = 1500 if LONG else 300
#: Half the time the parent's SIGKILL comes after a random delay up to this (the child may end
#: first); else the child kills itself at its end.
KILL_WITHIN = 8.0 if LONG else 0.6
SNAPSHOTS = 10 if LONG else 5
CHILD_TIMEOUT = 600
TOTALS = collections.defaultdict(collections.Counter)


def _seeds(config, default):
    seed = config.getoption("seed", default=None)
    return (seed,) if seed is not None else tuple(default)


def pytest_generate_tests(metafunc):
    for name, default in (("alarm_seed", ALARM_SEEDS), ("opcode_seed", OPCODE_SEEDS),
                          ("memory_seed", MEMORY_SEEDS), ("entry_seed", ENTRY_SEEDS),
                          ("rollback_seed", ROLLBACK_SEEDS)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, _seeds(metafunc.config, default), ids=lambda s: f"seed{s}")


@pytest.fixture(scope="module")
def scratch():
    """Stores, logs and copies: in memory (/dev/shm) when there is one."""
    yield from scratch_folder("permastruct-interrupts-")


@pytest.fixture(scope="module", autouse=True)
def totals():
    yield
    if TOTALS:
        print("\n[interrupt totals] " + "; ".join(
            f"{mode}: {c['cases']} cases, {c['failed']} failed, {c['interrupts']} exceptions injected"
            for mode, c in TOTALS.items()))


def _iterations(config):
    return config.getoption("iterations", default=None) or ITERATIONS


# == the log of a child ===========================================================================
class Run:
    """What a child's log says: its states, returned and raised commits, copies, problems."""

    def __init__(self, events):
        self.states = {}
        self.returned = []        # (k, sid)
        self.raised = []          # (k, [sid]) commits that raised
        self.inflight = None      # (k, [sid]) a commit under way when the log ends
        self.snapshots = []       # (folder, sid, why, k)
        self.problems = []
        self.interrupts = collections.Counter()
        self.surfaced = collections.Counter()
        self.swallowed = collections.Counter()
        self.recent = collections.deque(maxlen=4)  # the last interrupts, for context
        self.ended = False
        for event in events:
            kind = event[0]
            if kind == "state":
                self.states[event[1]] = event[2]
            elif kind == "returned":
                self.returned.append((event[1], event[2]))
                self.inflight = None
            elif kind == "inflight":
                self.inflight = (event[1], event[2])
            elif kind == "failed":
                if self.inflight is not None:
                    self.raised.append(self.inflight)
                self.inflight = None
            elif kind == "interrupt":
                where = event[1].split(" (")[0]
                self.interrupts[f"{where}: {event[2]}" if event[2] != "-" else where] += 1
                self.recent.append(f"{event[1]}{'' if event[2] == '-' else ' -> ' + event[2]}")
            elif kind == "snapshot":
                self.snapshots.append((event[1], event[2], event[3], self.returned[-1][0]))
            elif kind == "surfaced":
                self.surfaced[event[1]] += 1
            elif kind == "swallowed":
                self.swallowed[event[1]] += 1
            elif kind == "problem":
                self.problems.append(event[1])
            elif kind == "end":
                self.ended = True

    @property
    def last(self):
        return self.returned[-1]

    def name(self, state):
        """Which commit(s) had ``state``."""
        returned = [k for k, sid in self.returned if self.states[sid] == state]
        if returned:
            return f"the state of returned commit(s) {returned}"
        raised = [k for k, sids in self.raised if any(self.states[sid] == state for sid in sids)]
        if raised:
            return f"the state of commit {raised[-1]}, whose commit() RAISED (it never returned)"
        return "a state no commit had"

    def judge(self, outcome, allowed, wanted):
        """None if ``outcome`` holds one of the states ``allowed`` (sids), else the reason."""
        if outcome.kind == "ok" and outcome.state in {self.states[sid] for sid in allowed}:
            return None
        if outcome.kind == "missing":
            return f"the store is gone (wanted {wanted})"
        if outcome.kind in ("notastore", "error"):
            return outcome.detail
        diff = K.describe_diff(outcome.state, self.states[allowed[0]])
        return f"found {self.name(outcome.state)}; wanted {wanted}; differences from it: {diff}"


def _read_files(folder):
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    return files


# == one child ================================================================================
def run_seed(name, seed, args, iterations, scratch, rerun):
    """Run a child with ``args`` (mode, exception, scopes), kill it, check what it left; report.

    In the timer test the parent SIGKILLs the child at a random moment half the
    time; the opcode tests leave it to the child (at its end, or after a
    problem), so that a seed reproduces exactly.
    """
    rng = random.Random(f"interrupts:{name}:{seed}")
    folder = tempfile.mkdtemp(prefix=f"{seed}-", dir=scratch)
    store, snaps, log = (os.path.join(folder, part) for part in ("store", "snaps", "log"))
    os.makedirs(store)
    os.makedirs(snaps)
    args = dict(args, dir=store, log=log, snapshot_dir=snaps, seed=seed, iterations=iterations,
                snapshots=SNAPSHOTS, page_size=(4096, 1024)[seed % 2])
    command = [sys.executable, CHILD, json.dumps(args)]
    env = dict(K.child_env(), PYTHONHASHSEED="0")
    child_line = (f"PYTHONPATH=src PYTHONHASHSEED=0 python3 tests/_interruptkit.py "
                  f"'{json.dumps(dict(args, dir='/tmp/i/store', log='/tmp/i/log', snapshot_dir='/tmp/i/snaps'))}' "
                  f"(after: rm -rf /tmp/i; mkdir -p /tmp/i/store /tmp/i/snaps)")
    report = K.Report(name, seed, f"{rerun}\n  the child alone: {child_line}", TOTALS)
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_by = "the parent"
    try:
        line = child.stdout.readline()
        if line.strip() != "ready":
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"{name}, seed {seed}: the child did not start: {line!r}\n{err[-3000:]}", pytrace=False)
        delay = rng.uniform(0.0, KILL_WITHIN) if args["mode"] == "alarm" and rng.random() < 0.5 else CHILD_TIMEOUT
        try:
            _, err = child.communicate(timeout=delay)  # (drains the pipes while it waits)
            killed_by = "itself"
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            _, err = child.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    run = Run(K.read_log(log))
    TOTALS[name].update(interrupts=sum(run.interrupts.values()))
    where_killed = (f"killed by {killed_by}" + (f" after {delay:.3f} s" if killed_by == "the parent" else "")
                    + f", {len(run.returned) - 1} commits returned, {len(run.raised)} raised; last interrupts: "
                    + ("; ".join(run.recent) or "none"))
    if child.returncode != -signal.SIGKILL:
        report.add(f"the child ended with exit code {child.returncode} instead of being killed:\n{err[-4000:]}",
                   0, where_killed, at="the child")
    for text in run.problems:
        report.add(f"the child saw: {text}", 0, where_killed + _stderr_tail(err), at="live")
    verifier = K.Verifier(tempfile.mkdtemp(dir=folder))
    for index, (snap, sid, why, k) in enumerate(run.snapshots):
        outcome = verifier.outcome(_read_files(snap), bare=index % 3 == 2)
        reason = run.judge(outcome, [sid], f"commit {k} (the last that returned)")
        report.add(reason and f"the files copied {why} (what a SIGKILL then leaves): {reason}", k,
                   f"taken {why}, commit {k} the last returned", at=f"copy {index + 1}")
    last_k, last_sid = run.last
    allowed, wanted = [last_sid], f"commit {last_k} (the last that returned)"
    if run.inflight is not None:
        allowed += run.inflight[1]
        wanted += f" or commit {run.inflight[0]} (in flight when the process died)"
    outcome = verifier.outcome(_read_files(store), bare=seed % 3 == 2, reopen=seed % 2 == 0)
    reason = run.judge(outcome, allowed, wanted)
    opener = "Storage(path)" if seed % 3 == 2 else "CrashStorage(path)"
    report.add(reason and f"reopened with {opener} after the SIGKILL: {reason}", last_k, where_killed,
               at="after the kill")
    shutil.rmtree(folder)
    extra = ""
    if run.surfaced:
        extra += f"; injected exceptions that surfaced as another type: {dict(run.surfaced)}"
    if run.swallowed:
        extra += f"; injected exceptions that never came out (swallowed): {dict(run.swallowed)}"
    report.finish(f"{sum(run.interrupts.values())} exceptions ({dict(run.interrupts.most_common(6))}), "
                  f"{len(run.returned) - 1} commits returned, {len(run.raised)} raised, "
                  f"{len(run.snapshots)} copies checked{extra}; {where_killed.split(',')[0]}")


def _stderr_tail(err):
    err = err.strip()
    return f"; the child's stderr ends: {err[-600:]}" if err else ""


def _rerun(test, seed, iterations):
    return (f"PYTHONPATH=src python3 -m pytest -p no:cacheprovider 'tests/test_interrupts.py::{test}' -s "
            f"--seed {seed} --iterations {iterations}")


# == the tests =================================================================================
def test_keyboard_interrupts_from_a_timer(request, alarm_seed, scratch):
    """KeyboardInterrupt from a SIGALRM handler after random delays, in mutations, commits and rollbacks."""
    iterations = _iterations(request.config)
    run_seed("KeyboardInterrupt from a timer", alarm_seed,
             {"mode": "alarm", "scopes": ["mutation", "commit", "rollback"], "low_us": 20, "high_us": 2000},
             iterations, scratch,
             _rerun("test_keyboard_interrupts_from_a_timer", alarm_seed, iterations)
             + " (timing-dependent: rerun a few times)")


def test_keyboard_interrupts_at_random_opcodes(request, opcode_seed, scratch):
    """KeyboardInterrupt after a random count of opcodes in the package: deterministic for a seed."""
    iterations = _iterations(request.config)
    run_seed("KeyboardInterrupt at random opcodes", opcode_seed,
             {"mode": "trace", "exception": "KeyboardInterrupt", "scopes": ["mutation", "commit", "rollback"]},
             iterations, scratch, _rerun("test_keyboard_interrupts_at_random_opcodes", opcode_seed, iterations))


def test_memory_errors_inside_commit(request, memory_seed, scratch):
    """MemoryError at a random opcode inside commit() (its checkpoints included), then retry or rollback."""
    iterations = _iterations(request.config)
    run_seed("MemoryError inside commit()", memory_seed,
             {"mode": "trace", "exception": "MemoryError", "scopes": ["commit"], "hot": 0.5},
             iterations, scratch, _rerun("test_memory_errors_inside_commit", memory_seed, iterations))


def test_keyboard_interrupts_inside_rollback(request, rollback_seed, scratch):
    """KeyboardInterrupt at random opcodes inside rollback() only (the transactions' rollbacks and with
    blocks' exits): a rollback retried after it was interrupted must leave the last returned commit."""
    iterations = _iterations(request.config)
    run_seed("KeyboardInterrupt inside rollback()", rollback_seed,
             {"mode": "trace", "exception": "KeyboardInterrupt", "scopes": ["rollback"]},
             iterations, scratch, _rerun("test_keyboard_interrupts_inside_rollback", rollback_seed, iterations))


# == the harness itself ========================================================================
def test_no_injection_is_a_clean_run(scratch):
    """With the injector never armed, the same program finds nothing."""
    run_seed("no injection (the harness itself)", 0, {"mode": "alarm", "hot": 0.0}, ITERATIONS, scratch,
             _rerun("test_no_injection_is_a_clean_run", 0, ITERATIONS))


def test_exceptions_before_the_library_does_anything(request, entry_seed, scratch):
    """The known-good case: KeyboardInterrupt at the first opcode of every call into the package.

    Nothing inside the library has happened yet, so every acceptance rule must
    hold whatever the engine does with exceptions: this exercises the
    program's retries, rollbacks, candidate states and the parent's checks.
    """
    iterations = _iterations(request.config)
    run_seed("exceptions at the first opcode (the harness itself)", entry_seed,
             {"mode": "trace", "exception": "KeyboardInterrupt", "scopes": ["mutation", "commit", "rollback"],
              "low_ops": 1, "high_ops": 1, "hot": 0.5}, iterations, scratch,
             _rerun("test_exceptions_before_the_library_does_anything", entry_seed, iterations))
