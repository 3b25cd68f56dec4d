"""One virtual environment per foreign framework, created on first use and reused after.

A venv counts as ready when its marker file lists exactly the requirements asked for, so
changing a pin rebuilds it. Failures come back as a reason string, never an exception:
the comparison then reports the framework as unavailable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

MARKER = ".prefjax-bench-ready"


def requirements(framework: str) -> list[str]:
    """pip requirements of a framework's venv (the JAX ones pin prefjax's jax so XLA is the same)."""
    import jax

    same_jax = f"jax=={jax.__version__}"
    table = {
        # CPU wheel of torch on Linux x86 from PyPI; TRL pulls transformers, accelerate, datasets.
        "trl": ["torch==2.13.0", "trl", "safetensors"],
        "tunix": ["google-tunix", same_jax, "safetensors"],
    }
    return table[framework]


def python_for(framework: str, root: Path, install: bool) -> tuple[Optional[str], str]:
    """(python executable, "") when the venv is usable, else (None, reason)."""
    if framework.startswith("prefjax"):
        return sys.executable, ""
    venv = root / framework
    reqs = requirements(framework)
    python = venv / "bin" / "python"
    marker = venv / MARKER
    if python.is_file() and marker.is_file() and marker.read_text().split("\n") == reqs:
        return str(python), ""
    if not install:
        return None, f"no ready venv at {venv} (run without --no-install to create it)"
    print(f"[setup] creating {venv}: pip install {' '.join(reqs)}", file=sys.stderr, flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                     if ln.strip() and not ln.startswith("WARNING")]
            return None, f"{' '.join(cmd[:4])} failed: {lines[-1] if lines else proc.returncode}"
    marker.write_text("\n".join(reqs))
    return str(python), ""
