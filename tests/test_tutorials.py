"""Every tutorial notebook runs top to bottom.

By default in its fast mode (``PYROFLOWS_FAST=1`` shrinks the training budgets to seconds); the
committed notebooks hold the outputs of a full run. ``PYROFLOWS_TUTORIALS_FULL=1`` runs the full
budgets instead (minutes per notebook; on request only).
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))
FULL = os.environ.get("PYROFLOWS_TUTORIALS_FULL") == "1"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, monkeypatch, tmp_path):
    if not FULL:
        monkeypatch.setenv("PYROFLOWS_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=900 if FULL else 180,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
