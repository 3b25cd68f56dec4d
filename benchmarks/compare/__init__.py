"""Helpers of benchmarks/compare_trl_tunix.py: the shared workload, per-framework runners, venvs, table.

The runners (run_*.py) execute inside each framework's own virtual environment and
import only runner_common from this folder, never prefjax (except run_prefjax.py).
"""
