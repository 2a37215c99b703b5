"""Shared pytest set-up for the whole project: doctests clean up the folders they make.

The examples in ``docs/``, ``README.md`` and the package's docstrings make their
stores in ``tempfile.mkdtemp()`` folders, as a newcomer would, and do not
remove them (that would clutter every example).  For doctest items only, the
fixture below records each folder ``tempfile.mkdtemp`` creates while the item
runs and removes it afterwards.  It closes nothing: a store an example left
open keeps its open file, which Linux allows to be removed.  Other tests use
pytest's ``tmp_path`` and are left alone.
"""

import shutil
import tempfile

import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_temporary_folders(request, monkeypatch):
    """Remove the folders that ``tempfile.mkdtemp`` made during a doctest item."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    made = []
    original = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        folder = original(*args, **kwargs)
        made.append(folder)
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    try:
        yield
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
