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

from hypothesis import settings  # noqa: E402

# jit compilation makes the first examples slow: no per-example deadline.
# derandomize keeps CI reproducible; failures still print their example.
settings.register_profile("prefjax", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("prefjax")
