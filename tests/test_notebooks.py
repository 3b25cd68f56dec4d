"""Every notebook in colabs/ runs headless at small size."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(COLABS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PREFJAX_NOTEBOOK_OUTPUT", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert list(tmp_path.glob("*.png")), f"{path.name} wrote no plot"
