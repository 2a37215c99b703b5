"""R1/R2 reliability tests: after a process crash or a power loss at any point, the store is a commit.

DESIGN.md 3.8 and 8: after any crash a store reopens to exactly the state of
the last commit that returned (or of the commit that was in flight), and
``check()`` passes; with ``sync=True`` a returned commit survives power loss,
with ``sync=False`` a power loss may lose the latest commits but never
consistency.  The machinery (workload, recorder, replay) is in ``_crashkit``.

* ``test_process_crash_at_every_operation``: one child runs a seeded random
  workload and logs every file operation (with its bytes) and the model state
  of every commit.  The parent then rebuilds the files as they are when the
  process dies just before operation N, for every N, opens them (the schema's
  class, or every third time the bare ``Storage``), runs ``check()`` and
  compares the state with the commits.
* ``test_power_loss`` / ``test_power_loss_sync_false``: the same log replayed
  as power losses: per file only what was fsynced is sure; later writes are
  applied, dropped or torn per 512-byte sector, later allocations and
  truncations applied or dropped, files created after the last directory fsync
  may vanish.  Several random variants per N, plus "every unsynced write lost".
* ``test_kill_at_every_operation``: real deaths.  A child per crash point
  (forked from a server process that imported everything once) kills itself
  with SIGKILL (every fourth one with ``os._exit``) just before operation N.
* ``test_kill_at_random_times``: children that run the workload without end on
  one store (on disk, so that fsyncs take time) are SIGKILLed from outside
  after a random delay, round after round; each round goes on from the store
  the last one left.  Whether a round hits a commit is up to the timing.

Failures name the mode, seed, N (and variant), the operation and commits at N,
and say what was wrong: the first failure, then one case of each kind.  The
counts are printed (``pytest -s``).  ``--seed`` and ``--iterations`` (random
operations of the recorded workload; the kill workload takes at most
``KILL_ITERATIONS``) and ``PERMASTRUCT_STRESS=1`` (conftest.py) make longer runs::

    PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_crash.py -s --seed 5 --iterations 600
    PERMASTRUCT_STRESS=1 PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_crash.py -s
"""

import collections
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

import _crashkit as K
from conftest import DEFAULT_SEEDS, LONG_SEEDS, _long_run

#: Random power-loss variants per crash point (besides "all unsynced writes lost").
POWER_VARIANTS = 8 if _long_run() else 2
#: Random operations of the workload of test_kill_at_every_operation (a child per operation).
KILL_ITERATIONS = 400 if _long_run() else 100
#: Rounds of test_kill_at_random_times.
KILL_ROUNDS = 60 if _long_run() else 12
#: At most this many kinds of failure are shown, each with one case.
SHOWN = 8
CHILD_TIMEOUT = 600


def page_size_for(seed):
    return (4096, 1024)[seed % 2]


@pytest.fixture(scope="module")
def scratch():
    """A directory for stores and logs: in memory (/dev/shm) when there is one, fsyncs are cheap there."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="permastruct-crash-", dir=base)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _store_files(folder):
    """The files of a store's directory: name -> bytes."""
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    return files


@pytest.fixture(scope="module")
def recording(scratch):
    """``recording(seed, iterations, sync)``: the Timeline of one recorded run and the files it left (cached)."""
    cache = {}

    def get(seed, iterations, sync, history=0):
        key = (seed, iterations, sync, history)
        if key not in cache:
            folder = os.path.join(scratch, f"record-{seed}-{iterations}-{int(sync)}-{history}")
            store = os.path.join(folder, "store")
            os.makedirs(store)
            log = os.path.join(folder, "log")
            command = K.child_command("record", dir=store, log=log, seed=seed, iterations=iterations,
                                      sync=sync, page_size=page_size_for(seed), history=history)
            done = subprocess.run(command, env=K.child_env(), capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT)
            if done.returncode != 0:
                pytest.fail(f"the recording workload (seed {seed}, {iterations} iterations, sync={sync}) "
                            f"failed with exit code {done.returncode}; this is not a crash "
                            f"failure:\n{done.stderr[-4000:]}", pytrace=False)
            timeline = K.Timeline(K.read_log(log))
            assert timeline.ended, f"the recording of seed {seed} did not end"
            files = _store_files(store)
            os.unlink(log)
            shutil.rmtree(store)
            cache[key] = timeline, files
        return cache[key]
    return get


@pytest.fixture
def verifier(scratch):
    folder = tempfile.mkdtemp(dir=scratch)
    yield K.Verifier(folder)
    shutil.rmtree(folder, ignore_errors=True)


#: Cases and failures of every mode, printed at the end of the module.
TOTALS = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def totals():
    yield
    if TOTALS:
        print("\n[crash totals] " + "; ".join(f"{mode}: {c['cases']} cases, {c['failed']} failed"
                                             for mode, c in TOTALS.items()))


def _rerun(node, seed, iterations=None):
    extra = f" --iterations {iterations}" if iterations is not None else ""
    return (f"PYTHONPATH=src python3 -m pytest -p no:cacheprovider 'tests/test_crash.py::{node}' -s "
            f"--seed {seed}{extra}")


def _where(timeline, n, when="before"):
    """``before op 12: pwrite store.ps @0x3000 +4096; commit 3 returned, 4 in flight``."""
    expect = timeline.at[min(n + (when == "after"), len(timeline.at) - 1)]
    returned = f"commit {expect.returned[0]} returned" if expect.returned else "no commit returned yet"
    inflight = f", {expect.inflight[0]} in flight" if expect.inflight else ""
    return f"{timeline.describe_op(n, when)}; {returned}{inflight}"


def _creating(expect):
    return "while the store was being created: " if expect.returned is None else ""


# == process crash, replayed =============================================================
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_process_crash_at_every_operation(stress_seed, stress_iterations, recording, verifier, sync):
    """The files as a process crash just before each operation leaves them: the last returned commit or the one in flight."""
    _process_crash(stress_seed, stress_iterations, recording, verifier, sync, 0,
                   f"test_process_crash_at_every_operation[seed{stress_seed}-{'sync' if sync else 'nosync'}]")


#: ``history=`` of the workloads of the history tests: undo() is one of their transactions.
HISTORY = 6


def test_process_crash_with_history(stress_seed, stress_iterations, recording, verifier):
    """With history=N, commits write before-images and undo() is a transaction: a crash anywhere leaves
    the state before or after, whole; and the recovered history undoes to a state the workload had."""
    _process_crash(stress_seed, stress_iterations, recording, verifier, True, HISTORY,
                   f"test_process_crash_with_history[seed{stress_seed}]")


def _process_crash(stress_seed, stress_iterations, recording, verifier, sync, history, test):
    timeline, final_files = recording(stress_seed, stress_iterations, sync, history)
    report = K.Report(f"process crash, sync={sync}" + (f", history={history}" if history else ""), stress_seed,
                      _rerun(test, stress_seed, stress_iterations), TOTALS, SHOWN)
    files = K.CrashFiles()
    for n in range(len(timeline.ops) + 1):
        if n:
            files.apply(timeline.ops[n - 1])
        expect = timeline.at[n]
        outcome = verifier.outcome(files.image(), bare=n % 3 == 2, reopen=n % 5 == 4,
                                   undo=bool(history) and n % 3 == 1)
        reason = K.judge(outcome, timeline, expect)
        report.add(reason and _creating(expect) + reason, n, _where(timeline, n))
    # The harness itself: replaying every operation gives the files the child left, byte for byte.
    rebuilt = {name: bytes(data) for name, data in files.image().items()}
    assert rebuilt == final_files, "the replay does not rebuild the files of the recorded run: the harness is broken"
    report.finish(f"{len(timeline.ops) + 1} crash points, {len(timeline.returned_list)} commits, "
                  f"{verifier.opened} distinct files opened")


# == power loss, simulated =================================================================
def _power_loss(seed, iterations, recording, verifier, sync, lossy, test, history=0):
    timeline, _ = recording(seed, iterations, sync, history)
    report = K.Report(f"power loss, sync={sync}" + (f", history={history}" if history else ""), seed,
                      _rerun(test, seed, iterations), TOTALS, SHOWN)
    files = K.PowerLossFiles()
    uncertain_points = 0
    for n in range(len(timeline.ops) + 1):
        if n:
            files.apply(timeline.ops[n - 1])
        expect = timeline.at[n]
        variants = POWER_VARIANTS + 1 if files.uncertain() else 1
        uncertain_points += variants > 1
        for variant in range(variants):
            rng = random.Random(f"power:{seed}:{n}:{variant}")
            outcome = verifier.outcome(files.image(rng, drop_all=variant == 0), bare=(n + variant) % 3 == 2,
                                       undo=bool(history) and (n + variant) % 3 == 1)
            reason = K.judge(outcome, timeline, expect, lossy=lossy)
            if reason and outcome.kind == "missing":
                reason += " (it was created, and its directory not fsynced after that)"
            report.add(reason and _creating(expect) + reason, n, _where(timeline, n), variant)
    report.finish(f"{len(timeline.ops) + 1} crash points ({uncertain_points} with unsynced writes), "
                  f"{report.cases} power-loss cases, {verifier.opened} distinct files opened")


def test_power_loss(stress_seed, stress_iterations, recording, verifier):
    """sync=True: a commit that returned survives; the state is that commit or the one in flight."""
    _power_loss(stress_seed, stress_iterations, recording, verifier, True, False, "test_power_loss")


def test_power_loss_sync_false(stress_seed, stress_iterations, recording, verifier):
    """sync=False: the state is some commit that had returned (or the one in flight), or no store."""
    _power_loss(stress_seed, stress_iterations, recording, verifier, False, True, "test_power_loss_sync_false")


def test_power_loss_with_history(stress_seed, stress_iterations, recording, verifier):
    """history=N, sync=True: a commit or undo() that returned survives, and so does the history that
    undoes it (the history file is fsynced before the log that held it starts over)."""
    _power_loss(stress_seed, stress_iterations, recording, verifier, True, False, "test_power_loss_with_history",
                history=HISTORY)


# == real deaths ===========================================================================
def _kill_seeds(config):
    seed = config.getoption("seed", default=None)
    if seed is not None:
        return (seed,)
    return LONG_SEEDS[:3] if _long_run() else (0,)


def _kill_iterations(config):
    value = config.getoption("iterations", default=None)
    return min(value, KILL_ITERATIONS) if value is not None else KILL_ITERATIONS


class KillServers:
    """Two server processes (``_crashkit killserver``), each forking one doomed workload at a time."""

    def __init__(self, count, **args):
        self.procs = [subprocess.Popen(K.child_command("killserver", **args), env=K.child_env(),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
                      for _ in range(count)]
        self.selector = selectors.DefaultSelector()
        for proc in self.procs:
            self.selector.register(proc.stdout, selectors.EVENT_READ, proc)
        self.busy = {}

    def idle(self):
        return [proc for proc in self.procs if proc not in self.busy]

    def send(self, proc, request):
        self.busy[proc] = request
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()

    def results(self, timeout=CHILD_TIMEOUT):
        """Wait for answers: a list of (request, answer)."""
        ready = self.selector.select(timeout)
        if not ready:
            raise AssertionError(f"no kill server answered within {timeout} s")
        out = []
        for key, _ in ready:
            proc = key.data
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"a kill server died (exit code {proc.wait()})")
            out.append((self.busy.pop(proc), json.loads(line)))
        return out

    def close(self):
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.selector.close()


def test_kill_at_every_operation(request, scratch, recording, verifier):
    """A real process death (SIGKILL, or os._exit) just before each file operation of a small workload."""
    iterations = _kill_iterations(request.config)
    for seed in _kill_seeds(request.config):
        _kill_at_every_operation(seed, iterations, scratch, recording, verifier)


def test_kill_at_every_operation_with_history(request, scratch, recording, verifier):
    """The same with history=N: commits log before-images and undo() is one of the transactions."""
    iterations = _kill_iterations(request.config)
    for seed in _kill_seeds(request.config):
        _kill_at_every_operation(seed, iterations, scratch, recording, verifier, HISTORY)


def _kill_at_every_operation(seed, iterations, scratch, recording, verifier, history=0):
    timeline, _ = recording(seed, iterations, True, history)
    total = len(timeline.ops)
    test = "test_kill_at_every_operation" + ("_with_history" if history else "")
    report = K.Report("kill at every operation" + (f", history={history}" if history else ""), seed,
                      _rerun(test, seed, iterations), TOTALS, SHOWN)
    base = os.path.join(scratch, f"kill-{seed}-{history}")
    servers = KillServers(2, seed=seed, iterations=iterations, sync=True, page_size=page_size_for(seed),
                          history=history)
    statuses = collections.Counter()
    pending = list(range(total))
    try:
        while pending or servers.busy:
            for proc in servers.idle():
                if pending:
                    n = pending.pop(0)
                    folder = os.path.join(base, str(n))
                    servers.send(proc, {"n": n, "dir": os.path.join(folder, "store"),
                                        "log": os.path.join(folder, "log"),
                                        "how": "exit" if n % 4 == 3 else "sigkill"})
            for req, answer in servers.results():
                n, folder = req["n"], os.path.dirname(req["dir"])
                statuses[answer["status"]] += 1
                if answer["status"] == "error":
                    pytest.fail(f"kill at N={n}, seed {seed}: the workload failed before its kill point "
                                f"(not a crash failure):\n{answer.get('error', '')[-4000:]}", pytrace=False)
                if answer["status"] == "finished":
                    shutil.rmtree(folder)
                    continue
                run = K.Timeline(K.read_log(req["log"]))
                if len(run.ops) != n:
                    report.add(f"the child logged {len(run.ops)} operations but was to die before "
                               f"operation {n}", n, "harness")
                expect = run.at[-1]
                outcome = verifier.outcome(_store_files(req["dir"]), bare=n % 3 == 2, reopen=n % 5 == 4,
                                           undo=bool(history) and n % 3 == 1)
                reason = K.judge(outcome, run, expect)
                report.add(reason and _creating(expect) + reason, n, f"{answer['status']} " + _where(run, n))
                shutil.rmtree(folder)
    finally:
        servers.close()
    report.finish(f"{statuses['killed'] + statuses['exited']} process deaths ({statuses['killed']} SIGKILL, "
                  f"{statuses['exited']} os._exit) at {total} operations; {statuses['finished']} "
                  "runs ended before their kill point")


def test_kill_at_random_times(request, tmp_path, verifier):
    """SIGKILL from outside at random times; each round goes on from the store the last one left.

    The store is on a real disk (pytest's tmp_path), not in /dev/shm: there a
    commit's fsyncs take time, so a kill often lands inside a commit.
    """
    seed = request.config.getoption("seed", default=None)
    seed = 0 if seed is None else seed
    rng = random.Random(f"kill-random:{seed}")
    folder = str(tmp_path)
    store = os.path.join(folder, "store")
    os.makedirs(store)
    report = K.Report("kill at random times", seed, _rerun("test_kill_at_random_times", seed), TOTALS, SHOWN)
    prior = None
    operations = commits = 0
    for round_ in range(KILL_ROUNDS):
        log = os.path.join(folder, f"log{round_}")
        child = subprocess.Popen(K.child_command("loop", dir=store, log=log, seed=seed * 1000 + round_, sync=True,
                                                 page_size=page_size_for(seed + round_)),
                                 env=K.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(rng.uniform(0.0, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.returncode != -signal.SIGKILL:
            pytest.fail(f"round {round_}: the looping workload ended by itself (exit code {child.returncode}) "
                        f"before it was killed:\n{child.stderr.read()[-4000:]}", pytrace=False)
        child.stdout.close()
        child.stderr.close()
        run = K.Timeline(K.read_log(log), prior=prior)
        operations += len(run.ops)
        commits += sum(1 for k, _ in run.returned_list if k > 0)
        expect = run.at[-1]
        outcome = verifier.outcome(_store_files(store), bare=round_ % 3 == 2, reopen=True)
        reason = K.judge(outcome, run, expect)
        report.add(reason and _creating(expect) + reason, len(run.ops),
                   f"round {round_}, killed " + _where(run, len(run.ops) - 1, "after"))
        if reason is not None:
            break  # the next round would go on from a broken store
        if outcome.kind != "ok":  # killed while creating it: the next round creates it again
            shutil.rmtree(store)
            os.makedirs(store)
        prior = outcome.state
    report.finish(f"{report.cases} kills from outside, after {operations} file operations and {commits} "
                  "returned commits in all")


# == the harness itself ======================================================================
def test_power_loss_model():
    """The power-loss simulator keeps what was fsynced, tears writes at sector boundaries only."""
    files = K.PowerLossFiles()
    old, new = b"o" * 2048, b"n" * 1500
    for op in [("create", "f"), ("pwrite", "f", old, 0), ("fsync", "f"), ("fsync_dir", "f"),
               ("pwrite", "f", new, 300), ("create", "g"), ("pwrite", "g", b"x" * 10, 0)]:
        files.apply(op)
    assert files.uncertain()
    assert files.image(random.Random(0), drop_all=True) == {"f": bytearray(old)}
    seen = set()
    for variant in range(300):
        image = files.image(random.Random(variant))
        f = bytes(image["f"])
        assert len(f) == 2048 and f[:300] == old[:300] and f[1800:] == old[1800:]
        for start in (300, 512, 1024, 1536):  # 300..511, 512..1023, ...: each piece all old or all new
            end = min(1800, (start // 512 + 1) * 512)
            assert f[start:end] in (old[start:end], new[start - 300:end - 300])
        seen.add(f)
        assert image.get("g") in (None, bytearray(), bytearray(b"x" * 10)) or (
            len(image["g"]) == 10)  # "g" was created after the directory fsync: it may vanish
    assert len(seen) > 8  # dropped, applied and torn writes all occur
    files.apply(("fsync", "f"))
    files.apply(("fsync", "g"))
    files.apply(("fsync_dir", "g"))
    assert not files.uncertain()
    expected = bytearray(old)
    expected[300:1800] = new
    assert files.image(random.Random(1)) == {"f": expected, "g": bytearray(b"x" * 10)}


# == what the replays cover ==============================================================
class _NoRecorder:
    def mark(self, *args):
        pass

    def failed(self, k):
        pass


def test_the_recorded_workload_relocates_and_cuts_the_file(stress_seed, stress_iterations, tmp_path, monkeypatch):
    """The replays above (every operation, process crash and power loss) cover pack()'s relocation
    and its truncating checkpoint: the same seeded workload, run here without a recorder, moves
    objects in its packs and gives the file's free end back at a checkpoint (a hole, or a cut).
    (Other seeds may happen to pack nothing movable: skipped, not failed.)"""
    from permastruct import _pack
    from permastruct._commit import Engine
    from permastruct._mapping import FileIO
    moved, cuts = [], []
    relocate, give_back = _pack._relocate, Engine._give_back

    def counting_relocate(*args):
        result = relocate(*args)
        moved.append(len(result))
        return result

    def counting_give_back(self, main_pages):
        before = os.stat(self.path).st_blocks
        give_back(self, main_pages)
        if os.stat(self.path).st_blocks < before:
            cuts.append(before - os.stat(self.path).st_blocks)
    monkeypatch.setattr(_pack, "_relocate", counting_relocate)
    monkeypatch.setattr(Engine, "_give_back", counting_give_back)
    monkeypatch.setattr(Engine, "fresh_bytes", Engine.fresh_bytes)  # (the workload sets it)
    monkeypatch.setattr(FileIO, "hook", None)
    workload = K.Workload(str(tmp_path), stress_seed, stress_iterations, _NoRecorder(),
                          page_size=page_size_for(stress_seed))
    try:
        workload.run()
    finally:
        if workload.p is not None:
            workload.p.close()
    if stress_seed not in DEFAULT_SEEDS and not (sum(moved) and cuts):
        pytest.skip(f"seed {stress_seed}: its packs found nothing to move ({moved}) or no end to cut "
                    f"({len(cuts)} cuts); the default seeds do")
    assert moved and sum(moved) > 0, moved
    assert cuts, "no checkpoint gave blocks back"
