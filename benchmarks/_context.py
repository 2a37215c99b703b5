"""The run context every workload gets: mode, folder, stores, logging, size choice."""

import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field

from .harness import OURS, PEERS, Stats, available_peers

MODES = ("smoke", "quick", "full")


@dataclass
class Context:
    mode: str = "quick"
    dir: str = ""
    stores: list = field(default_factory=lambda: list(PEERS))
    peers: dict = field(default_factory=available_peers)
    verbose: bool = True
    reuse: bool = True  # reuse stores built by an earlier run in the same --dir
    out = None  # where the progress goes (None: sys.stdout at the time)

    def pick(self, *, smoke, quick, full):
        """The value for the current mode."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    def log(self, text):
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=self.out or sys.stdout, flush=True)

    def path(self, *names):
        path = os.path.join(self.dir, *names)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def fresh(self, *names):
        """A path in the run folder with nothing at it (an old file or folder there is removed)."""
        path = self.path(*names)
        remove(path)
        return path

    def skipped(self, store):
        """The note of a store that cannot run here, or ``""``."""
        if store not in self.peers:
            return ""
        ok, reason = self.peers[store]
        return "" if ok else f"skipped: {reason}"

    def run_stores(self, table, case, impls):
        """Add one row per store of this run to ``table`` for ``case``.

        ``impls`` maps a store to a callable returning :class:`Stats` (or
        ``(Stats, extra_dict)``), or to a string: the note of a store for
        which the workload does not apply (``"n/a: ..."``).  A store that is
        missing from ``impls`` gets an "n/a" row; one that is not installed a
        "skipped: X not installed" row; one that fails a "failed: ..." row
        (the traceback is logged) - the run goes on.
        """
        for store in self.stores:
            impl = impls.get(store, "n/a: not part of this workload")
            if isinstance(impl, str):
                table.add(case, store, note=impl)
                continue
            skip = self.skipped(store)
            if skip:
                table.add(case, store, note=skip)
                continue
            try:
                result = impl()
            except Exception as exc:  # a peer failing must not stop the suite
                self.log(f"{store} failed in {table.name} {case}:\n" + traceback.format_exc())
                table.add(case, store, note=f"failed: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            if isinstance(result, str):
                table.add(case, store, note=result)
                continue
            extra = {}
            if isinstance(result, tuple):
                result, extra = result
            if not isinstance(result, Stats):
                result = Stats.of(result)
            table.add(case, store, result, extra.pop("note", ""), **extra)
            if self.verbose:
                self.log(f"{table.name} {case} {store}: median {result.median * table.scale:,.4g} {table.unit}")


def remove(path):
    """Remove a file or a folder (and a store's ``-wal`` and history files) if it is there."""
    for name in (path, path + "-wal", path + "-history", path + "-history2"):
        if os.path.isdir(name) and not os.path.islink(name):
            shutil.rmtree(name, ignore_errors=True)
        elif os.path.lexists(name):
            os.unlink(name)


def ours_first(stores):
    return sorted(stores, key=lambda store: store != OURS)
