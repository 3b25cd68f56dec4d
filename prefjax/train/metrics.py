"""The trainer's metric plumbing: writing, late fetching, FLOPs, MFU and a progress line.

    writer = MetricsWriter(workdir)             # metrics.jsonl + TensorBoard, process 0 only
    writer.truncate_after(start_step)           # on resume: forget records past the checkpoint
    late = OneStepLate()
    for step in range(start_step, total_steps):
        state, device_metrics = train_step(state, batch)      # dispatched, not waited for
        if (fetched := late.push(step + 1, device_metrics)) is not None:
            writer.write(*fetched)              # the previous step's numbers, now on the host
    if (fetched := late.flush()) is not None:
        writer.write(*fetched)

Steps are counted as steps done (1-based: the record of the first step is
step 1), the same count a checkpoint is saved under.

Step time (`StepTimer`) is the wall time between two steps' metrics reaching the host,
less the time spent on work that is not a step (compiling a program, saving a
checkpoint, evaluating): such work runs inside `timer.excluded(late.wait)`, which first
waits for the step in flight so that none of the step's own device time is excluded.
Tokens/s and MFU come from that time, so no step is credited or charged with compilation.

FLOPs count the model's useful arithmetic (see `forward_flops_per_token`), so
`mfu` is model FLOPs utilisation: work a step needs over what the devices could
have done in its wall time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.models.config import ModelConfig

_log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# JSON has no NaN or Infinity; they are written as these strings (float() reads them back).
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# --------------------------------------------------------------------------- writing

def _json_value(name: str, value: Any) -> Any:
    """A JSON-safe scalar: ints stay ints, floats stay floats, NaN/Inf become strings."""
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} has shape {array.shape}; only scalars can be written")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    item = float(item)
    if math.isnan(item):
        return "NaN"
    if math.isinf(item):
        return "Infinity" if item > 0 else "-Infinity"
    return item


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, with "NaN"/"Infinity"/"-Infinity" turned back into floats.

    A torn last line (a crash mid-write) is skipped; a bad line elsewhere raises
    ValueError naming the file and line.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                _log.warning("%s:%d: skipping a torn last line (%s)", path, number, err)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer 'step' field")
        records.append({k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()})
    return records


class MetricsWriter:
    """Appends one JSON object per `write` to workdir/metrics.jsonl and mirrors the scalars
    to TensorBoard (tensorboardX, under workdir/tensorboard).

    Only process 0 writes (and only when `enabled`); elsewhere every method is a
    no-op, so the trainer calls it unconditionally. Each line is
    {"step": step, **metrics}; NaN and +-Inf are written as the strings "NaN",
    "Infinity", "-Infinity" (TensorBoard gets the float), and read back by
    `read_metrics`. tensorboardX is imported only when it is first needed (it
    imports torch when torch is installed, ~1.5 s).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
        self.active = bool(enabled) and jax.process_index() == 0
        self._use_tensorboard = tensorboard
        self._tb = None
        self._purge_step: Optional[int] = None
        self._file = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a")

    def _tensorboard(self):
        if self._tb is None and self._use_tensorboard:
            from tensorboardX import SummaryWriter  # lazy: see the class docstring

            self._tb = SummaryWriter(logdir=self.tensorboard_dir, purge_step=self._purge_step)
        return self._tb

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (scalars: floats, ints, numpy scalars, or strings) for `step`.

        Values should already be on the host (OneStepLate returns them so): reading
        a device array here would block, and the trainer's transfer guard forbids it.
        """
        if not self.active:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; it is written from the `step` argument")
        record = {"step": int(step)}
        record.update({name: _json_value(name, value) for name, value in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()  # a crash (a NaN abort, a preemption) keeps every written line
        tb = self._tensorboard()
        if tb is not None:
            for name, value in record.items():
                if name != "step":
                    number = _NONFINITE.get(value, value) if isinstance(value, str) else value
                    if isinstance(number, (int, float)):
                        tb.add_scalar(name, float(number), int(step))

    def truncate_after(self, step: int) -> None:
        """Keep the records with step <= `step` and drop the later ones (they will be redone).

        Call it on resume with the restored checkpoint's step count (records
        counted as steps done, so the next record is step + 1); with 0-based
        step indices pass the first index to redo minus one. metrics.jsonl is
        rewritten atomically and TensorBoard is told to purge its events from
        step + 1 on (tensorboardX's purge_step), so neither shows a step twice.
        """
        if not self.active:
            return
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["step"] <= step] if os.path.exists(self.path) else []
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps({k: _json_value(k, v) for k, v in record.items()}, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._purge_step = int(step) + 1
        if self._tb is not None:  # reopen so the purge marker goes into a fresh event file
            self._tb.close()
            self._tb = None

    def flush(self) -> None:
        if self.active:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            self.active = False

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- one step late

def _to_host(tree: Any) -> Any:
    """device_get, with 0-d results as Python scalars."""
    host = jax.device_get(tree)
    return jax.tree.map(lambda x: x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x, host)


class OneStepLate:
    """Holds a step's device metrics until the next step has been dispatched.

    JAX dispatches asynchronously: fetching a step's metrics right after calling
    the step would block the host until the device finishes it, leaving the
    device idle while the host prepares the next batch. Fetching step t's
    metrics only after step t+1 is queued keeps the device busy.
    """

    def __init__(self) -> None:
        self._pending: Optional[tuple[int, Any]] = None

    def push(self, step: int, device_metrics: Any) -> Optional[tuple[int, Any]]:
        """Hold this step's metrics; return the previous step's (step, host metrics), if any."""
        for leaf in jax.tree.leaves(device_metrics):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()  # starts the transfer; does not wait
        previous, self._pending = self._pending, (step, device_metrics)
        if previous is None:
            return None
        return previous[0], _to_host(previous[1])

    def flush(self) -> Optional[tuple[int, Any]]:
        """The held step's (step, host metrics) (blocking), or None; call it after the loop."""
        previous, self._pending = self._pending, None
        if previous is None:
            return None
        return previous[0], _to_host(previous[1])

    def wait(self) -> None:
        """Blocks until the held step's metrics are computed (the step has finished)."""
        if self._pending is not None:
            jax.block_until_ready(self._pending[1])


# --------------------------------------------------------------------------- step time

class StepTimer:
    """Wall time per step, without the time of work that is not a step (module docstring).

        timer = StepTimer()                      # the first step's time starts now
        with timer.excluded(late.wait):          # compile / checkpoint / evaluate
            ...
        seconds = timer.lap()                    # when a step's metrics arrive on the host
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._last = clock()
        self._excluded = 0.0
        self.excluded_total = 0.0

    def lap(self) -> float:
        """Seconds since the previous lap (or the start), less the excluded time in between."""
        now = self._clock()
        seconds = now - self._last - self._excluded
        self._last, self._excluded = now, 0.0
        return max(seconds, 1e-9)

    @contextlib.contextmanager
    def excluded(self, wait: Optional[Callable[[], None]] = None) -> Iterator[None]:
        """Time inside is not step time; `wait` (e.g. OneStepLate.wait) runs first, counted."""
        if wait is not None:
            wait()  # the step in flight finishes on step time, not inside the exclusion
        start = self._clock()
        try:
            yield
        finally:
            spent = self._clock() - start
            self._excluded += spent
            self.excluded_total += spent


# --------------------------------------------------------------------------- FLOPs

def matmul_params(model_cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: q/k/v/o, the MLP, and the unembedding.

    The input embedding is a gather (no FLOPs); a tied embedding still costs its
    D x V unembedding matmul. Biases and norm scales are elementwise, left out.
    """
    c = model_cfg
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attn + mlp) + c.hidden_size * c.vocab_size


def _mean_visible_keys(seq_len: int, window: Optional[int]) -> float:
    """Average number of keys a causal query sees in a row of seq_len tokens."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # Query i sees min(i + 1, window) keys.
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def forward_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs of one token's forward pass in a causal row of seq_len tokens.

    2 * matmul_params (a multiply and an add per weight) plus attention: per
    layer, the scores q.k and the weighted sum of v cost 2 * heads * head_dim
    FLOPs each per visible key, i.e. 4 * heads * head_dim * keys. A causal query
    sees (T + 1) / 2 keys on average (fewer on sliding-window layers), so this
    is about half of the usual 4 * L * T * D estimate, which counts every key.
    It is the work a causal-aware kernel needs; a dense masked attention does
    the full T x T and will show a lower MFU rather than an inflated one.
    Packed rows are counted as one causal row of seq_len (an upper bound).
    Elementwise work (norms, softmax, RoPE, activations) is left out.
    """
    c = model_cfg
    attention = sum(4.0 * c.num_heads * c.head_dim * _mean_visible_keys(seq_len, c.layer_window(layer))
                    for layer in range(c.num_layers))
    return 2.0 * matmul_params(c) + attention


def preference_step_flops(model_cfg: ModelConfig, tokens_per_step: int, seq_len: int,
                          reference_forward: bool, train: bool = True) -> float:
    """FLOPs of one preference step over tokens_per_step tokens in rows of seq_len.

    Policy: forward + backward = 3 forwards when training (backward ~ 2x
    forward), 1 forward otherwise; plus one forward of a frozen reference when
    `reference_forward`. That is the usual (6N + 2N) per token for N parameters.
    Pass the tokens the step computes (rows x row length, padding included) for
    hardware utilisation, or the real tokens for useful throughput.
    """
    per_token = forward_flops_per_token(model_cfg, seq_len)
    policy = 3.0 if train else 1.0
    reference = 1.0 if reference_forward else 0.0
    return float(tokens_per_step) * per_token * (policy + reference)


# --------------------------------------------------------------------------- peak rate

# Dense (non-sparse) bf16 matmul peak per JAX device, from the vendors' datasheets.
# TPUs by their exact device_kind (every TPU here is one JAX device per chip);
# aliases cover the names other jax versions report ("TPU v5" is v5p).
TPU_PEAK_BF16_FLOPS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5": 459e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}
# GPUs by words in device_kind; the first pattern whose words all occur wins.
# NVL variants (lower clocks) are left out and fall back to a measurement.
GPU_PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756e12),
    (("h100", "hbm3"), 989e12),   # SXM: "NVIDIA H100 80GB HBM3"
    (("h100", "sxm"), 989e12),
    (("h200",), 989e12),          # SXM: "NVIDIA H200" (also GH200)
    (("a100",), 312e12),          # SXM and PCIe alike
)
_TABLE_DTYPES = ("bfloat16", "float16")

_measured: dict[tuple[str, str, str], float] = {}


def _datasheet_peak(device: Any, dtype: str) -> Optional[float]:
    kind = str(getattr(device, "device_kind", "")).lower().strip()
    platform = str(getattr(device, "platform", "")).lower()
    if platform == "tpu" and dtype == "bfloat16":
        return TPU_PEAK_BF16_FLOPS.get(kind)
    if platform == "gpu" and dtype in _TABLE_DTYPES and "nvl" not in kind:
        for words, peak in GPU_PEAK_BF16_FLOPS:
            if all(word in kind for word in words):
                return peak
    return None


def measure_matmul_flops(device: Any, dtype: str, size: int, reps: int = 5) -> float:
    """Best observed FLOP/s of a jitted size x size matmul on `device`."""
    with jax.default_device(device):
        a = jnp.ones((size, size), dtype)
        b = jnp.full((size, size), 0.5, dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def device_peak_flops(device: Any = None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one JAX device, where the number comes from).

    TPUs and GPUs in the tables above (bf16; fp16 too on GPUs) come from the
    datasheet. Anything else is measured once per process with a jitted matmul
    and cached: on CPU always in float32 (the CPU run's compute dtype), and the
    host's rate is split evenly over the process's CPU devices, since fake
    devices (--xla_force_host_platform_device_count) share the same cores.
    """
    device = jax.local_devices()[0] if device is None else device
    peak = _datasheet_peak(device, dtype)
    if peak is not None:
        return peak, f"datasheet ({device.device_kind}, dense {dtype})"
    platform = str(device.platform).lower()
    dtype = "float32" if platform == "cpu" else dtype
    key = (platform, str(device.device_kind), dtype)
    if key not in _measured:
        _measured[key] = measure_matmul_flops(device, dtype, size=1024 if platform == "cpu" else 8192)
    rate = _measured[key]
    if platform == "cpu":
        shares = len(jax.local_devices(backend="cpu"))
        return rate / shares, (f"measured ({dtype} matmul on {device.device_kind}: {rate / 1e9:.1f} GFLOP/s "
                               f"for the host, shared by {shares} device(s))")
    return rate, f"measured ({dtype} matmul on {device.device_kind}, not in the datasheet table)"


def mfu(step_flops: float, step_seconds: float, num_devices: int, peak: Any) -> float:
    """Model FLOPs utilisation: step_flops / (step_seconds * num_devices * peak per device).

    `peak` is a FLOP/s number or device_peak_flops()'s (number, source) pair.
    """
    peak = peak[0] if isinstance(peak, tuple) else peak
    if step_seconds <= 0 or num_devices <= 0 or peak <= 0:
        raise ValueError(f"mfu needs positive step_seconds, num_devices and peak; got {step_seconds}, "
                         f"{num_devices}, {peak}")
    return float(step_flops) / (float(step_seconds) * num_devices * float(peak))


# --------------------------------------------------------------------------- progress line

def _si(x: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f}{suffix}"
    return f"{x:.1f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fmt(value: Any) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


# Shown by default when present (the trainer's names); other metrics only when asked for.
PROGRESS_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate", "mfu")


class ProgressBar:
    """A console line every `every_steps` steps or `every_seconds` seconds (and at the end):

        step 120/1000 (12.0%) | loss 0.6931 | grad_norm 1.2 | 2.05k tok/s | 0.125 s/step | ETA 1m50s

    `update(step, ...)` takes the number of steps completed (a 0-based loop index
    + 1). Rates are over the steps since the previous line. `keys` picks and
    orders the metrics shown (default: those of PROGRESS_KEYS present, or all
    when none is). Only process 0 prints.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, tokens_per_step: Optional[int] = None,
                 every_steps: int = 10, every_seconds: float = 60.0, keys: Optional[Sequence[str]] = None,
                 enabled: bool = True, print_fn: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.keys = keys
        self.tokens_per_step = tokens_per_step
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.enabled = bool(enabled) and jax.process_index() == 0
        self._print = print_fn
        self._clock = clock
        self._last_step = start_step
        self._last_time = clock()

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of one-off work (compiling) out of the rate and the ETA."""
        self._last_time += seconds

    def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None,
               keys: Optional[Sequence[str]] = None) -> Optional[str]:
        """Print (and return) the line if one is due; `keys` overrides the constructor's."""
        if not self.enabled:
            return None
        now = self._clock()
        due = (step - self._last_step >= self.every_steps or now - self._last_time >= self.every_seconds
               or step >= self.total_steps)
        if not due or step <= self._last_step:
            return None
        seconds_per_step = (now - self._last_time) / (step - self._last_step)
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)"]
        metrics = metrics or {}
        keys = keys if keys is not None else self.keys
        if keys is None:
            keys = [k for k in PROGRESS_KEYS if k in metrics] or list(metrics)
        for key in keys:
            if key in metrics:
                parts.append(f"{key} {_fmt(metrics[key])}")
        if self.tokens_per_step and seconds_per_step > 0:
            parts.append(f"{_si(self.tokens_per_step / seconds_per_step)} tok/s")
        parts.append(f"{seconds_per_step:.3g} s/step")
        parts.append(f"ETA {_duration(max(self.total_steps - step, 0) * seconds_per_step)}")
        line = " | ".join(parts)
        self._print(line)
        self._last_step, self._last_time = step, now
        return line
