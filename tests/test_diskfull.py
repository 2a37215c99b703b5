"""R5 on a real file system: a small tmpfs that becomes full at every allocating write.

DESIGN.md 3.8 and R5: a full disk during growth or commit raises
``StorageFullError`` (an ``OSError``), and the storage stays at its last commit
and usable.  tests/test_failures.py injects the error (through ``FileIO.hook``
or by replacing the system calls); here the kernel says it, on a tmpfs of
``TMPFS_SIZE`` mounted for the module, so that writes can also be *short*: a
``pwrite`` that runs out of space part-way has written its first pages.

How (one seed, the crash kit's workload, ``_crashkit.Workload``):

1. **Calibration**: a forked child runs the workload in the empty tmpfs and
   logs every file operation (``FileIO.hook``, the kit's ``Recorder``) with
   the space the tmpfs had in use before it.  The operations after which more
   is in use are the *allocating writes*: the growth of the main file
   (``fallocate``), log writes that extend the log, the store's creation,
   and whatever a checkpoint, a close or a reopen allocates.
2. **One case per allocating write N and amount F** (F = 0, one page, or half
   of what N allocates): a forked child runs the same workload; just before
   operation N its hook fills the tmpfs with a ballast file so that only F
   bytes stay free.  Operation N then fails for real (with F > 0 a ``pwrite``
   is cut short: its first F bytes are in the file).  The child checks what
   R5 promises:

   * the exception out of the workload is a ``StorageFullError`` (``ENOSPC``);
   * the live store, after ``rollback()``, reads exactly the last commit that
     returned, and its ``check()`` passes;
   * a copy of the files as they are now (what a SIGKILL now leaves) reopens
     at exactly that commit, ``check()`` passing (checked by the parent);
   * variant ``kill``: the child SIGKILLs itself right away; variant ``free``:
     a small commit while the disk is still full is refused with
     ``StorageFullError`` (then rolled back) or goes in, the ballast is
     deleted, a later commit of a few workload steps must go in (the live
     store equals the model), and then the child SIGKILLs itself.

   The parent frees the tmpfs and reopens the store as it was left (the
   schema's class, or every third case the bare ``Storage``), runs
   ``check()``, and wants exactly the last commit that returned: the commit
   that raised ``StorageFullError`` must not be found.

A failure names the seed, the case (``op=N,free=F,kill|free``: rerun it alone
with ``--case``), the operation that failed and the workload's commit at that
moment.  Defaults are small (two seeds, a sample of the cases); ``--seed``,
``--iterations``, ``--case`` and ``PERMASTRUCT_STRESS=1`` (every case, more
seeds) make longer runs::

    PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_diskfull.py -s
    PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_diskfull.py -s --seed 1 --case op=10,free=524288,kill
    PERMASTRUCT_STRESS=1 PYTHONPATH=src python3 -m pytest -p no:cacheprovider tests/test_diskfull.py -s

Needs Linux and the right to mount a tmpfs (root, or CAP_SYS_ADMIN); skipped
with the reason otherwise.
"""

import collections
import copy
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest

import _crashkit as K
from conftest import LONG_SEEDS, _long_run, scratch_folder
from permastruct._mapping import FileIO
from permastruct.errors import StorageFullError
from permastruct.pages import PageFile

MIB = 1 << 20
#: The tmpfs: big enough for the whole workload (its files peak under 2 MiB at 600 iterations).
TMPFS_SIZE = 4 * MIB
PAGE = 4096
#: Checkpoints (and log resets) several times a run.
CHECKPOINT_BYTES = 64 << 10
SEEDS = LONG_SEEDS if _long_run() else (0, 1, 2)
ITERATIONS = 600 if _long_run() else 300
#: Cases per seed by default (every case with PERMASTRUCT_STRESS=1).
SAMPLE = 24
#: A case for one checkpoint write in this many.
CHECKPOINT_EVERY = 5
TOTALS = collections.defaultdict(collections.Counter)
STORE = "store"
BALLAST = "ballast"


def _seeds(config):
    seed = config.getoption("seed", default=None)
    return (seed,) if seed is not None else SEEDS


def pytest_generate_tests(metafunc):
    if "diskfull_seed" in metafunc.fixturenames:
        metafunc.parametrize("diskfull_seed", _seeds(metafunc.config), ids=lambda s: f"seed{s}")


# == the tmpfs ================================================================================
@pytest.fixture(scope="module")
def tmpfs():
    """A tmpfs of TMPFS_SIZE mounted on a new directory, unmounted afterwards; skip where it cannot be."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"a tmpfs needs Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root (this process runs as uid {os.geteuid()})")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command on this machine")
    folder = tempfile.mkdtemp(prefix="permastruct-tmpfs-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", folder],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here (mount said: {done.stderr.strip() or done.returncode}); "
                    "a container without CAP_SYS_ADMIN cannot")
    try:
        info = os.statvfs(folder)
        assert info.f_blocks * info.f_frsize == TMPFS_SIZE, "the tmpfs is not of the size asked for"
        yield folder
    finally:
        if subprocess.run(["umount", folder], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", folder], capture_output=True)
        os.rmdir(folder)


@pytest.fixture(scope="module")
def scratch():
    """Logs, copies and the verifier's files: outside the tmpfs (in /dev/shm when there is one)."""
    yield from scratch_folder("permastruct-diskfull-")


@pytest.fixture(scope="module", autouse=True)
def totals():
    yield
    if TOTALS:
        print("\n[disk full totals] " + "; ".join(f"{mode}: {c['cases']} cases, {c['failed']} failed"
                                                 for mode, c in TOTALS.items()))


def used(folder):
    """Bytes in use on the file system of ``folder``."""
    info = os.statvfs(folder)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


def available(folder):
    info = os.statvfs(folder)
    return info.f_bavail * info.f_frsize


def fill(folder, leave):
    """Make a ballast file in ``folder`` so that ``leave`` bytes stay free; return what is free."""
    size = available(folder) - leave
    if size > 0:
        fd = os.open(os.path.join(folder, BALLAST), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    return available(folder)


def empty(folder):
    for name in os.listdir(folder):
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)


def read_files(folder):
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    return files


# == the children (forked from this process: everything is imported already) ==================
def forked(work, error_file, *args):
    """Run ``work(*args)`` in a forked child that must end by SIGKILLing itself; return its wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            work(*args)
            code = 4  # (it returned instead of killing itself)
        except BaseException:
            with open(error_file, "w") as f:
                f.write(traceback.format_exc())
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def child_calibrate(folder, log, seed, iterations):
    """The workload in the empty tmpfs; before each operation the log gets ``("used", bytes)``."""
    store = os.path.join(folder, STORE)
    os.makedirs(store)
    rec = K.Recorder(log, store, with_data=False)

    def hook(operation, path, *args):
        rec.note("used", used(folder))
        rec.hook(operation, path, *args)
    FileIO.hook = hook
    PageFile.checkpoint_bytes = CHECKPOINT_BYTES
    K.Workload(store, seed, iterations, rec, sync=True).run()
    rec.note("used", used(folder))
    rec.note("end", rec.count)
    die()


class Case:
    """Fill the disk so that ``free`` bytes stay free just before operation ``op``."""

    def __init__(self, op, free, variant, phase, grows):
        self.op, self.free, self.variant, self.phase, self.grows = op, free, variant, phase, grows

    @property
    def name(self):
        return f"op={self.op},free={self.free},{self.variant}"


def child_full(folder, log, copies, seed, iterations, case):
    """The workload until the disk is full at ``case.op``, then R5's checks (see the module docstring)."""
    store = os.path.join(folder, STORE)
    os.makedirs(store)
    rec = K.Recorder(log, store, with_data=False)

    def problem(text):
        rec.note("problem", text)

    def hook(operation, path, *args):
        if rec.count == case.op:
            rec.note("filled", case.op, fill(folder, case.free))
        rec.hook(operation, path, *args)
    FileIO.hook = hook
    PageFile.checkpoint_bytes = CHECKPOINT_BYTES
    w = K.Workload(store, seed, iterations, rec, sync=True)
    try:
        w.run()
    except StorageFullError as exc:
        failed_op = rec.count - 1
        rec.failed(w.commits + 1)  # whatever was in flight raised: it must not be found
        rec.note("full", failed_op, exc.errno, str(exc))
        if exc.errno != errno.ENOSPC:
            problem(f"StorageFullError with errno {exc.errno} ({errno.errorcode.get(exc.errno)}), not ENOSPC")
    except BaseException as exc:
        rec.failed(w.commits + 1)
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        rec.note("wrong", rec.count - 1, f"{type(exc).__name__}: {exc}{at}")
        die()
    else:
        rec.note("nofull")
        die()
    FileIO.hook = rec.hook  # no more filling
    p = w.p
    live = p is not None and not p.closed
    if p is None and os.listdir(store):
        problem(f"the store's creation failed but left {sorted(os.listdir(store))} behind")
    if live:
        try:
            p.rollback()
            actual = K.dumps(K.store_state(p))
            if actual != w.last_state:
                problem(f"after the StorageFullError and rollback() the live store is not at its last returned "
                        f"commit {w.commits}: {K.describe_diff(actual, w.last_state)}")
        except Exception as exc:
            problem(f"rollback() or reading the live store after the StorageFullError raised "
                    f"{type(exc).__name__}: {exc}")
            live = False
        try:
            p.check()
        except Exception as exc:
            problem(f"the live store's check() after the StorageFullError and rollback() raised "
                    f"{type(exc).__name__}: {exc}")
            live = False
    # What a SIGKILL now would leave: every byte the process wrote is in the files.
    shutil.copytree(store, copies)
    rec.note("copy", copies, None if p is None else w.commits)
    if case.variant == "kill":
        die()
    if live:  # still full: a small commit is refused cleanly, or goes in
        w.m = copy.deepcopy(w.committed)
        try:
            p.root.count = w.m.count = (w.m.count + 1) % 1000
            w._inflight(w.m)
            p.commit()
        except StorageFullError:
            rec.failed(w.commits + 1)
            p.rollback()
            w.m = copy.deepcopy(w.committed)
            actual = K.dumps(K.store_state(p))
            if actual != w.last_state:
                problem(f"a small commit on the still full disk raised StorageFullError; after rollback() "
                        f"the live store is not at commit {w.commits}: {K.describe_diff(actual, w.last_state)}")
        except Exception as exc:
            problem(f"a small commit on the still full disk raised {type(exc).__name__}: {exc}")
            die()
        else:
            w._returned(p, w.m)
            w.committed = copy.deepcopy(w.m)
    os.unlink(os.path.join(folder, BALLAST))
    rec.note("freed")
    if p is None:
        die()  # the creation failed: nothing to go on with
    try:
        if not live:
            if not p.closed:
                p.close()
            w.p = p = w.open()
            w.m = K.model_from_store(p)
            actual = K.dumps(K.model_state(w.m))
            if actual != w.last_state:
                problem(f"reopened after the StorageFullError (space freed), the store is not at its last "
                        f"returned commit {w.commits}: {K.describe_diff(actual, w.last_state)}")
                die()
            w.committed = copy.deepcopy(w.m)
        w.m = copy.deepcopy(w.committed)
        for _ in range(3):
            w.step(p, w.m)
        w._inflight(w.m)
        p.commit()
        w._returned(p, w.m)  # (compares the live store with the model)
        p.check()
        rec.note("later", w.commits)
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
        problem(f"once space was freed, a later commit failed: {type(exc).__name__}: {exc}{at}")
    die()


# == the parent side ===========================================================================
def _status_text(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        extra = " (a mapped page without backing store was touched)" if sig == signal.SIGBUS else ""
        return f"died of {signal.Signals(sig).name}{extra}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _child_error(status, error_file):
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return None
    text = ""
    if os.path.exists(error_file):
        with open(error_file) as f:
            text = f.read()[-3000:]
    return f"the child {_status_text(status)}" + (f":\n{text}" if text else "")


def _op_key(op):
    """An operation's kind and file, without the random part of a temporary name."""
    return op[0], op[1].split(".creating-")[0]


def _phase(timeline, n):
    """What the workload was doing at operation ``n``: creating, growing, committing (the log) or checkpointing."""
    kind, key = timeline.ops[n][0], timeline.ops[n][1]
    expect = timeline.at[n]
    if expect.returned is None:
        return "creation"
    if expect.inflight is None:
        return f"growth ({kind} {key})" if key == K.MAIN else f"between commits ({kind} {key})"
    if key == K.MAIN:
        return "checkpoint or close (store.ps)"
    return f"commit ({kind} {key})"


@pytest.fixture(scope="module")
def calibration(tmpfs, scratch):
    """``calibration(seed, iterations)``: the Timeline of a run and the cases of its allocating writes."""
    cache = {}

    def get(seed, iterations):
        key = (seed, iterations)
        if key not in cache:
            empty(tmpfs)
            log = os.path.join(scratch, f"calibrate-{seed}")
            error_file = log + ".error"
            status = forked(child_calibrate, error_file, tmpfs, log, seed, iterations)
            error = _child_error(status, error_file)
            if error:
                pytest.fail(f"the calibration run of seed {seed} ({iterations} iterations) on an empty tmpfs "
                            f"failed; this is no disk-full failure: {error}", pytrace=False)
            events = K.read_log(log)
            timeline = K.Timeline(events)
            usage = [event[1] for event in events if event[0] == "used"]
            assert len(usage) == len(timeline.ops) + 1, "a 'used' event per operation, and one at the end"
            empty(tmpfs)
            cases = []
            peak = max(usage)
            if peak > TMPFS_SIZE - 64 * 1024:
                pytest.fail(f"seed {seed}: the workload of {iterations} iterations needs {peak} bytes, the "
                            f"tmpfs has {TMPFS_SIZE}: fewer --iterations", pytrace=False)
            checkpoint_writes = 0
            for n in range(len(timeline.ops)):
                grows = usage[n + 1] - usage[n]
                phase = _phase(timeline, n)
                if grows <= 0:
                    # A checkpoint writes into space the main file has (the growth allocated it):
                    # full from here on, the checkpoint goes on and a later write fails.  (One in
                    # CHECKPOINT_EVERY of them: they are many, and much alike.)
                    if phase.startswith("checkpoint") and timeline.ops[n][0] == "pwrite":
                        if checkpoint_writes % CHECKPOINT_EVERY == 0:
                            cases.append(Case(n, 0, ("free", "kill")[len(cases) % 2], phase, 0))
                        checkpoint_writes += 1
                    continue
                frees = [0]
                if grows > PAGE:
                    frees.append(PAGE)
                if grows >= 4 * PAGE:
                    frees.append(grows // 2 // PAGE * PAGE)
                for free in frees:
                    variant = ("free", "kill")[len(cases) % 2]
                    cases.append(Case(n, free, variant, phase, grows))
            cache[key] = timeline, cases
        return cache[key]
    return get


def _sample(cases, count):
    """``count`` cases, taken in turn from each phase (evenly spread within it); every case in long runs."""
    if _long_run() or len(cases) <= count:
        return list(cases)
    groups = collections.defaultdict(list)
    for case in cases:
        groups[case.phase.split(" (")[0]].append(case)
    picked = set()
    rank = 0
    while len(picked) < count:
        for group in groups.values():
            # the rank-th pick of a group: spread over it as a van der Corput sequence
            if rank < len(group) and len(picked) < count:
                index = int(_spread(rank) * len(group))
                while group[index].name in picked:
                    index = (index + 1) % len(group)
                picked.add(group[index].name)
        rank += 1
    return [case for case in cases if case.name in picked]


def _spread(rank):
    """0, 1/2, 1/4, 3/4, 1/8, ...: the rank-th point of the base-2 van der Corput sequence."""
    value, scale = 0.0, 0.5
    while rank:
        value += scale * (rank & 1)
        rank >>= 1
        scale /= 2
    return value


def test_a_full_tmpfs_at_every_allocating_write(request, diskfull_seed, tmpfs, scratch, calibration):
    """StorageFullError, the live store at its last commit, and after a SIGKILL exactly that commit."""
    seed = diskfull_seed
    iterations = request.config.getoption("iterations", default=None) or ITERATIONS
    timeline, cases = calibration(seed, iterations)
    only = request.config.getoption("case", default=None)
    if only is not None:
        selected = [case for case in cases if case.name == only]
        if not selected:
            pytest.fail(f"seed {seed}, {iterations} iterations has no case {only!r}; it has "
                        f"{', '.join(case.name for case in cases[:40])}...", pytrace=False)
    else:
        selected = _sample(cases, SAMPLE)
    rerun = (f"PYTHONPATH=src python3 -m pytest -p no:cacheprovider "
             f"'tests/test_diskfull.py::test_a_full_tmpfs_at_every_allocating_write' -s --seed {seed} "
             f"--iterations {iterations} --case CASE (CASE as named above)")
    report = K.Report("disk full on a tmpfs", seed, rerun, TOTALS)
    verifier_dir = os.path.join(scratch, "verify")
    os.makedirs(verifier_dir, exist_ok=True)
    verifier = K.Verifier(verifier_dir)
    outcomes = collections.Counter()
    phases = collections.Counter()
    for index, case in enumerate(selected):
        empty(tmpfs)
        work = os.path.join(scratch, f"case-{seed}-{index}")
        os.makedirs(work)
        log, copies, error_file = (os.path.join(work, name) for name in ("log", "copy", "error"))
        status = forked(child_full, error_file, tmpfs, log, copies, seed, iterations, case)
        events = K.read_log(log)
        run = K.Timeline(events)
        notes = collections.defaultdict(list)
        for event in events:
            if event[0] not in ("op", "mark"):
                notes[event[0]].append(event[1:])
        if notes["full"]:
            failed_op, _, message = notes["full"][0]
            where_failed = (f"StorageFullError ({message.replace(tmpfs + os.sep, '')}), the last file "
                            f"operation before it: {run.describe_op(failed_op, 'was')[4:]}")
        elif notes["wrong"]:
            failed_op, message = notes["wrong"][0]
            where_failed = (f"{message}, the last file operation before it: "
                            f"{run.describe_op(failed_op, 'was')[4:]}")
        else:
            where_failed = "nothing failed"
        last = notes["copy"][0][1] if notes["copy"] else run.returned_list[-1][0] if run.returned_list else None
        last = "none (the store was being created)" if last is None else last
        where = (f"case {case.name}: {case.phase}, disk filled leaving {case.free} of the {case.grows} bytes "
                 f"it allocates; {where_failed}; last returned commit then: {last}")
        phases[case.phase.split(" (")[0]] += 1
        reasons = []
        error = _child_error(status, error_file)
        if error:
            reasons.append(error)
        if case.op < len(run.ops) and _op_key(run.ops[case.op]) != _op_key(timeline.ops[case.op]):
            reasons.append(f"harness: operation {case.op} is {run.ops[case.op][:2]}, but "
                           f"{timeline.ops[case.op][:2]} in the calibration run (the workload is not deterministic)")
        for _, text in notes["wrong"]:
            reasons.append(f"the full disk raised {text}, not StorageFullError")
        reasons.extend(text for (text,) in notes["problem"])
        if notes["nofull"]:
            outcomes["nothing failed"] += 1
        elif notes["full"]:
            outcomes["StorageFullError"] += 1
        # What a SIGKILL right after the StorageFullError leaves (a copy taken then).
        for path, k in notes["copy"]:
            sid = next((s for c, s in run.returned_list if c == k), None) if k is not None else None
            expect = K.Expect((k, sid) if sid is not None else None, None, len(run.returned_list))
            outcome = verifier.outcome(read_files(path), bare=index % 3 == 1)
            reason = K.judge(outcome, run, expect)
            if reason:
                reasons.append(f"the files right after the StorageFullError (a copy; what a SIGKILL then "
                               f"leaves): {reason}")
        # The store as the SIGKILL left it (space freed first: recovery may write).
        ballast = os.path.join(tmpfs, BALLAST)
        if os.path.exists(ballast):
            os.unlink(ballast)
        store = os.path.join(tmpfs, STORE)
        files = read_files(store) if os.path.isdir(store) else {}
        outcome = verifier.outcome(files, bare=index % 3 == 2, reopen=index % 2 == 0)
        reason = K.judge(outcome, run, run.at[-1])
        if reason:
            after = "after the later commit" if notes["later"] else "after the StorageFullError"
            reasons.append(f"reopened after the SIGKILL ({case.variant}, {after}): {reason}")
        report.add("; ".join(reasons) or None, case.op, where)
        shutil.rmtree(work)
    empty(tmpfs)
    report.finish(f"{len(selected)} of {len(cases)} cases ({dict(phases)}); {dict(outcomes)}")
