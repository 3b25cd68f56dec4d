"""Preemption: notice SIGTERM (TPU preemption, SLURM/Kubernetes eviction) and stop at a step boundary.

    with PreemptionWatcher() as watcher:
        for step in range(start, total):
            state, metrics = train_step(state, batch)
            if watcher.requested(step):
                ckpt.save(step, state, data_iterator=it, metadata=meta, force=True)
                ckpt.wait_until_finished()
                print(f"{watcher.reason()}: saved step {step}, exiting")
                return

Schedulers send SIGTERM some seconds (TPU VMs: ~30 s) before SIGKILL. The watcher never
acts inside the signal handler (saving there could interrupt a half-dispatched step); the
handler only sets a flag, which the loop reads at the next step boundary.

Two modes, chosen when the context is entered:

- Local (no `jax.distributed`, or its preemption service disabled): Python handlers for
  SIGTERM (and SIGINT if `handle_sigint`) set a flag; `requested()` returns it. The
  previous handlers are restored on exit. A second SIGINT runs the previous SIGINT handler
  (KeyboardInterrupt), so Ctrl-C twice still stops a stuck run.
- Coordinated (`jax.distributed` initialised with its preemption service, the default):
  jax's coordination service already catches SIGTERM (in C++), tells every process, and
  the processes agree on one step to stop at. `requested(step)` returns
  `jax.experimental.multihost_utils.reached_preemption_sync_point(step)`, which becomes true
  on all processes at the same step, so their collective `save` cannot deadlock. No Python
  handler is installed in this mode: it would replace jax's handler and the other
  processes would never hear of the preemption. Call `requested(step)` at every step,
  with the same steps on every process, as jax requires.

With `jax.distributed` but the preemption service disabled (`jax_enable_preemption_service
= False`), the local flag is per process: a multi-process trainer must then agree on it
itself (e.g. `multihost_utils.process_allgather(flag).any()`) before saving. A warning
says so.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Self

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

_Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL/SIG_IGN or None


def _coordination_available() -> bool:
    """True when jax.distributed runs with its preemption service (which owns SIGTERM)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatcher:
    """Context manager that turns SIGTERM (optionally SIGINT) into a polled stop request."""

    def __init__(self, *, handle_sigint: bool = False):
        self.handle_sigint = handle_sigint
        self.coordinated = False
        self._signal: int | None = None
        self._sync_step: int | None = None
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> Self:
        if self._previous:
            raise RuntimeError("PreemptionWatcher is already active; it cannot be entered twice")
        self.coordinated = _coordination_available()
        if self.coordinated:
            return self
        if threading.current_thread() is not threading.main_thread():
            # Python only installs signal handlers from the main thread.
            raise RuntimeError("PreemptionWatcher must be entered in the main thread (signal handlers)")
        if jax.distributed.is_initialized() and jax.process_count() > 1:
            logger.warning("jax.distributed is initialised without its preemption service: SIGTERM is seen "
                           "per process; agree across processes before saving")
        signals = [signal.SIGTERM] + ([signal.SIGINT] if self.handle_sigint else [])
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            # None means the previous handler was not installed from Python; the default is
            # the best that can be put back.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._signal is not None:
            previous = self._previous.get(signal.SIGINT)
            if callable(previous):
                previous(signum, frame)
                return
        if self._signal is None:
            self._signal = signum
        # Logging from a signal handler is safe in CPython: handlers run between bytecodes.
        logger.warning("%s received: will checkpoint and stop at the next step", signal.Signals(signum).name)

    def requested(self, step: int | None = None) -> bool:
        """Whether the run should checkpoint and stop now.

        step: the current step. Required in coordinated (multi-host) mode, where the answer
        comes from jax's preemption sync point and all processes must pass the same steps.
        """
        if not self.coordinated:
            return self._signal is not None
        if step is None:
            raise ValueError("PreemptionWatcher.requested(step): with jax.distributed the step is required "
                             "(processes must agree on where to stop)")
        if multihost_utils.reached_preemption_sync_point(int(step)):
            self._sync_step = int(step)
        return self._sync_step is not None

    def reason(self) -> str | None:
        """Why a stop was requested, for the exit message; None if it was not."""
        if self._sync_step is not None:
            return f"preemption sync point reached at step {self._sync_step}"
        if self._signal is not None:
            return f"{signal.Signals(self._signal).name} received"
        return None
