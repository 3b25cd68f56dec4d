"""What every framework runner shares: reading the job, timing steps, peak memory, the JSON reply.

Runs inside foreign virtual environments (TRL, Tunix), so it uses the standard library only.
A runner is started as `python run_<name>.py JOB.json RESULT.json`; it writes its result
(or {"error": ...}) to RESULT.json.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Callable


def read_job() -> dict[str, Any]:
    """The job description written by the orchestrator (see compare/workload.py Job.to_json)."""
    with open(sys.argv[1], encoding="utf-8") as f:
        return json.load(f)


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_device_peak_bytes(device: Any) -> int | None:
    """An accelerator's high-water mark of allocated bytes (None on CPU, whose allocator keeps no stats)."""
    if getattr(device, "platform", "cpu") == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class StepClock:
    """Collects per-step wall times, first-step completion time and per-step losses."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.first_step_done_at: float | None = None  # time.time(), compared with the launch time
        self._t0 = 0.0

    def begin(self) -> None:
        self._t0 = time.perf_counter()

    def end(self, loss: float | None = None) -> None:
        self.times.append(time.perf_counter() - self._t0)
        if self.first_step_done_at is None:
            self.first_step_done_at = time.time()
        if loss is not None:
            self.losses.append(float(loss))

    def summary(self, warmup: int) -> dict[str, Any]:
        timed = self.times[warmup:] or self.times[-1:]
        return dict(step_seconds=statistics.median(timed), step_times=self.times, losses=self.losses,
                    first_step_done_at=self.first_step_done_at, peak_rss=peak_rss_bytes())


def main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Runs `run(job)` and writes its dict (or the error) to the result file."""
    out = sys.argv[2]
    try:
        result = run(read_job())
    except Exception as err:  # reported as an "unavailable" row, never a crash of the comparison
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
