"""Test-suite settings: 8 fake CPU devices for sharding tests, and a hypothesis profile.

The device count must be set before JAX initialises its backend, so it is set
here, before any test module imports jax; so is a lower XLA CPU optimisation level
(compile time dominates the suite). Single-device tests are unaffected
(they run on device 0).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation
# passes cost more than they save here (a train step compiles ~2x faster at level 1; level 0 changes transcendental numerics). Speed
# is measured by benchmarks/, never by tests.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"

# One persistent XLA compilation cache for the session (its worker processes and the trainer
# subprocesses tests start inherit it): dozens of tests build the same tiny model and compile
# the same train step, which costs seconds each time on a CPU.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="prefjax-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from hypothesis import settings  # noqa: E402

# jit compilation makes the first examples slow: no per-example deadline.
# derandomize keeps CI reproducible; failures still print their example.
settings.register_profile("prefjax", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("prefjax")
