"""prefjax.train.metrics: metrics.jsonl and TensorBoard output, resume truncation, one-step-late
fetching, FLOP counts against independent counts, peak-rate lookup, MFU and the progress line."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from prefjax import models
from prefjax.models.attention import attention_mask
from prefjax.train import metrics

# --------------------------------------------------------------------------- writer

def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _events(logdir):
    """Every Event in the TFRecord event files under logdir (TFRecord framing parsed by hand)."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            payload = data[offset + 12:offset + 12 + length]  # skip the length's crc
            offset += 12 + length + 4                          # and the payload's crc
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
    return events


def _scalars(logdir):
    return [(e.step, v.tag, v.simple_value) for e in _events(logdir) for v in e.summary.value]


def test_jsonl_one_object_per_write(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(0, {"loss": 0.5, "tokens": 128, "acc": np.float32(0.25)})
        writer.write(1, {"loss": jnp.asarray(0.25), "note": "warm"})
    assert _lines(tmp_path / "metrics.jsonl") == [
        {"step": 0, "loss": 0.5, "tokens": 128, "acc": 0.25},
        {"step": 1, "loss": 0.25, "note": "warm"},
    ]


def test_nonfinite_values_are_strings_and_read_back(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(3, {"nan": float("nan"), "inf": np.inf, "ninf": jnp.asarray(-jnp.inf), "ok": 1.5})
    raw = (tmp_path / "metrics.jsonl").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert _lines(tmp_path / "metrics.jsonl")[0] == {"step": 3, "nan": "NaN", "inf": "Infinity",
                                                     "ninf": "-Infinity", "ok": 1.5}
    (record,) = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert math.isnan(record["nan"]) and record["inf"] == math.inf and record["ninf"] == -math.inf


def test_bad_metrics_are_named(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'hist'"):
            writer.write(0, {"hist": np.zeros(3)})
        with pytest.raises(ValueError, match="step"):
            writer.write(0, {"step": 1})


def test_truncate_after_drops_redone_steps(tmp_path):
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        for step in range(1, 7):
            writer.write(step, {"loss": float(step)})
    # Checkpointed after 3 steps, crashed after 6: the resumed run (a new writer on the
    # same workdir) redoes steps 4, 5 and 6.
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.truncate_after(3)
        for step in range(4, 6):
            writer.write(step, {"loss": 10.0 + step})
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 14.0, 15.0]


def test_truncate_on_a_fresh_workdir_and_torn_last_line(tmp_path):
    with metrics.MetricsWriter(str(tmp_path / "new"), tensorboard=False) as writer:
        writer.truncate_after(5)  # nothing to drop
        writer.write(6, {"x": 1.0})
    assert _lines(tmp_path / "new" / "metrics.jsonl") == [{"step": 6, "x": 1.0}]
    path = tmp_path / "torn" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x"')  # a crash mid-write
    with metrics.MetricsWriter(str(path.parent), tensorboard=False) as writer:
        writer.truncate_after(1)
    assert _lines(path) == [{"step": 0, "x": 1}]


def test_corrupt_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        metrics.read_metrics(str(path))


def test_tensorboard_scalars_readable(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.write(0, {"train/loss": 0.75, "train/acc": 0.5, "note": "skip me"})
        writer.write(1, {"train/loss": float("nan")})
    scalars = _scalars(tmp_path / "tensorboard")
    assert (0, "train/loss", 0.75) in scalars and (0, "train/acc", 0.5) in scalars
    assert not any(tag == "note" for _, tag, _ in scalars)
    (nan_value,) = [v for step, tag, v in scalars if step == 1]
    assert math.isnan(nan_value)


def test_tensorboard_purges_redone_steps(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, {"loss": 1.0})
        writer.write(2, {"loss": 2.0})
        writer.truncate_after(1)
        writer.write(2, {"loss": 3.0})
    events = _events(tmp_path / "tensorboard")
    starts = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [2]  # TensorBoard drops earlier events with step >= 2 when it sees this


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metrics.MetricsWriter(str(tmp_path / "w"))
    writer.write(0, {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()
    assert not (tmp_path / "w").exists()
    monkeypatch.undo()
    disabled = metrics.MetricsWriter(str(tmp_path / "d"), enabled=False)
    disabled.write(0, {"loss": 1.0})
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- one step late

class _Probe:
    """A metric leaf that records when the host reads it (jax.device_get calls __array__)."""

    def __init__(self, value, log):
        self.value, self.log = value, log

    def __array__(self, dtype=None, copy=None):
        self.log.append(self.value)
        return np.asarray(self.value, dtype=dtype)


def test_one_step_late_order_and_timing():
    log = []
    late = metrics.OneStepLate()
    assert late.push(0, {"loss": _Probe(0.0, log)}) is None
    assert log == []  # step 0 is not read while it may still be running
    step, host = late.push(1, {"loss": _Probe(1.0, log)})
    assert (step, host) == (0, {"loss": 0.0}) and log == [0.0]  # step 1 untouched
    assert late.push(2, {"loss": _Probe(2.0, log)}) == (1, {"loss": 1.0})
    assert late.flush() == (2, {"loss": 2.0})
    assert late.flush() is None
    assert log == [0.0, 1.0, 2.0]


def test_one_step_late_with_device_arrays_under_transfer_guard():
    step_fn = jax.jit(lambda x: {"loss": x * 2.0, "per_pair": jnp.arange(3.0) + x})
    inputs = [jnp.float32(step) for step in range(3)]  # on device before the guard
    late = metrics.OneStepLate()
    out = []
    with jax.transfer_guard("disallow"):  # the trainer's setting: no implicit transfers
        for step in range(3):
            got = late.push(step, step_fn(inputs[step]))
            if got is not None:
                out.append(got)
        out.append(late.flush())
    assert [s for s, _ in out] == [0, 1, 2]
    assert [m["loss"] for _, m in out] == [0.0, 2.0, 4.0]
    assert isinstance(out[1][1]["loss"], float)
    np.testing.assert_array_equal(out[2][1]["per_pair"], [2.0, 3.0, 4.0])


def test_step_timer_laps_leave_out_excluded_work():
    clock = _Clock()
    timer = metrics.StepTimer(clock=clock)
    clock.now += 0.5
    assert timer.lap() == pytest.approx(0.5)
    waited = []
    with timer.excluded(lambda: (waited.append(clock.now), setattr(clock, "now", clock.now + 0.2))):
        clock.now += 3.0  # a compile, a checkpoint, an evaluation
    clock.now += 0.3
    # the wait (the step in flight finishing) is step time; the 3 s inside are not
    assert waited == [100.5] and timer.lap() == pytest.approx(0.5)
    assert timer.excluded_total == pytest.approx(3.0)
    clock.now += 0.25
    assert timer.lap() == pytest.approx(0.25)  # exclusions do not carry over


def test_step_time_is_the_device_time_of_each_step_not_its_dispatch():
    # A jitted step of chained matmuls is dispatched asynchronously. With the trainer's pattern
    # (lap when the step's metrics reach the host), every step, the first included, measures
    # about one step's device time (timing the dispatch instead gave step 1 ~0 s), and a slow
    # exclusion between steps (after waiting for the step in flight) leaves the step's time in.
    import time

    def work(x):
        return {"loss": jax.lax.fori_loop(0, 80, lambda _, y: jnp.tanh(y @ y), x).sum()}

    step = jax.jit(work)
    x = jnp.eye(384) * 0.5
    step(x)["loss"].block_until_ready()  # compiled
    begin = time.perf_counter()
    step(x)["loss"].block_until_ready()
    alone = time.perf_counter() - begin  # one step's time, on this machine now
    late, timer, laps = metrics.OneStepLate(), metrics.StepTimer(), []
    for i in range(3):
        fetched = late.push(i + 1, step(x))
        if fetched is not None:
            laps.append(timer.lap())
        if i == 1:
            with timer.excluded(late.wait):
                time.sleep(4 * alone)
    late.flush()
    laps.append(timer.lap())
    assert len(laps) == 3 and all(0.3 * alone < lap < 3 * alone for lap in laps), (alone, laps)


# --------------------------------------------------------------------------- FLOPs

_KERNELS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def _independent_forward_flops(cfg, seq_len):
    """Matmul weights counted from the model's real parameter shapes; attention keys counted
    from the model's own mask."""
    _, shapes, _ = models.abstract(cfg)
    weights = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
                  if path[-1].key in _KERNELS)
    if cfg.tie_embeddings:
        weights += int(np.prod(shapes["embedding"].shape))  # the transposed embedding unembeds
    positions = jnp.arange(seq_len)[None]
    segments = jnp.ones((1, seq_len), jnp.int32)
    attention = 0.0
    for layer in range(cfg.num_layers):
        visible = int(attention_mask(positions, segments, positions, segments, cfg.layer_window(layer)).sum())
        attention += 2 * 2 * cfg.num_heads * cfg.head_dim * visible / seq_len  # q.k and p.v, mul + add
    return 2 * weights + attention


@pytest.mark.parametrize("preset", ["qwen2-tiny", "gemma2-tiny", "mistral-tiny", "qwen2-tiny-tied"])
@pytest.mark.parametrize("seq_len", [7, 40])
def test_forward_flops_match_an_independent_count(preset, seq_len):
    cfg = models.get_preset(preset)
    assert metrics.forward_flops_per_token(cfg, seq_len) == pytest.approx(
        _independent_forward_flops(cfg, seq_len), rel=1e-12)


def test_forward_flops_bracket_xla_cost_analysis():
    # XLA counts dense attention (every key, masked or not) plus elementwise work: its
    # number lies above our causal count and a little above the dense-attention count.
    cfg = models.get_preset("llama2-tiny", attention_impl="xla")
    graphdef, shapes, _ = models.abstract(cfg)
    b, t = 2, 64

    def forward(params, tokens):
        hidden, _ = models.apply(graphdef, params, tokens)
        return hidden @ models.unembedding(graphdef, params)

    compiled = jax.jit(forward).lower(shapes, jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = metrics.forward_flops_per_token(cfg, t) * b * t
    dense = ours + cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * (t * t - t * (t + 1) / 2) * b
    assert ours < dense <= xla <= 1.15 * dense


def test_preference_step_flops_follow_performance_md():
    cfg = models.get_preset("qwen2-tiny")
    per_token = metrics.forward_flops_per_token(cfg, 32)
    tokens = 8 * 2 * 32  # 8 pairs, chosen and rejected rows of 32
    with_ref = metrics.preference_step_flops(cfg, tokens, 32, reference_forward=True)
    without = metrics.preference_step_flops(cfg, tokens, 32, reference_forward=False)
    assert with_ref == pytest.approx(tokens * (3 + 1) * per_token)  # (6N + 2N) per token
    assert without == pytest.approx(tokens * 3 * per_token)         # precomputed reference: 6N
    assert without / with_ref == pytest.approx(0.75)                 # "a quarter of the work gone"
    assert metrics.preference_step_flops(cfg, tokens, 32, reference_forward=False, train=False) == \
        pytest.approx(tokens * per_token)


# --------------------------------------------------------------------------- peak rate, MFU

@pytest.mark.parametrize("platform,kind,want", [
    ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5", 459e12),
    ("tpu", "TPU v5p", 459e12),
    ("tpu", "TPU v6 lite", 918e12),
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
    ("gpu", "NVIDIA H100 PCIe", 756e12),
    ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312e12),
    ("gpu", "NVIDIA A100-PCIE-40GB", 312e12),
])
def test_datasheet_lookup(platform, kind, want):
    device = types.SimpleNamespace(platform=platform, device_kind=kind)
    peak, source = metrics.device_peak_flops(device)
    assert peak == want and source.startswith("datasheet")
    if platform == "gpu":
        assert metrics.device_peak_flops(device, dtype="float16")[0] == want


def test_unknown_kinds_are_not_guessed():
    def lookup(platform, kind, dtype="bfloat16"):
        return metrics._datasheet_peak(types.SimpleNamespace(platform=platform, device_kind=kind), dtype)

    assert lookup("tpu", "TPU v4 lite") is None      # the inference v4i, not a v4
    assert lookup("gpu", "NVIDIA H100 NVL") is None  # lower clocks than SXM
    assert lookup("gpu", "NVIDIA H100 80GB HBM3", "float32") is None
    assert lookup("cpu", "cpu") is None


def test_cpu_peak_is_measured_once():
    device = jax.local_devices()[0]
    peak, source = metrics.device_peak_flops(device)
    assert math.isfinite(peak) and peak > 0 and source.startswith("measured")
    host_rate = peak * len(jax.local_devices(backend="cpu"))
    assert 1e8 < host_rate < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s: a plausible CPU
    assert metrics.device_peak_flops(device) == (peak, source)  # cached, not re-measured


def test_mfu_arithmetic():
    # 1e15 FLOPs in 2 s on 4 devices of 250 TFLOP/s: 1e15 / (2 * 4 * 2.5e14) = 0.5.
    assert metrics.mfu(1e15, 2.0, 4, 2.5e14) == pytest.approx(0.5)
    assert metrics.mfu(1e15, 2.0, 4, (2.5e14, "datasheet")) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.mfu(1e15, 0.0, 4, 2.5e14)


# --------------------------------------------------------------------------- progress line

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_bar_format_and_cadence(capsys):
    clock = _Clock()
    bar = metrics.ProgressBar(100, start_step=20, tokens_per_step=512, every_steps=10, every_seconds=1e9,
                              clock=clock)
    printed = []
    for step in range(21, 41):
        clock.now += 0.25
        printed.append(bar.update(step, {"loss": 0.693147, "acc": 0.5, "tokens": 512}, keys=["loss", "acc"]))
    lines = capsys.readouterr().out.splitlines()
    assert [p for p in printed if p] == lines and len(lines) == 2  # steps 30 and 40
    # 10 steps in 2.5 s: 0.25 s/step, 512 / 0.25 = 2048 tokens/s, 60 steps left = 15 s.
    assert lines[1] == "step 40/100 (40.0%) | loss 0.6931 | acc 0.5 | 2.05k tok/s | 0.25 s/step | ETA 0m15s"
    assert re.match(r"step 30/100 \(30\.0%\) \| loss 0\.6931 \| acc 0\.5 \| .* \| ETA 0m18s$", lines[0])


def test_progress_bar_leaves_compile_time_out_of_its_rate(capsys):
    clock = _Clock()
    bar = metrics.ProgressBar(20, every_steps=10, every_seconds=1e9, clock=clock)
    clock.now += 30.0  # compiling the step
    bar.exclude(30.0)
    for step in range(1, 11):
        clock.now += 0.5
        line = bar.update(step, {"loss": 1.0})
    assert line == "step 10/20 (50.0%) | loss 1 | 0.5 s/step | ETA 0m05s"


def test_progress_bar_default_keys(capsys):
    clock = _Clock()
    bar = metrics.ProgressBar(10, every_steps=1, clock=clock)
    clock.now += 1
    line = bar.update(1, {"examples": 8, "grad_norm": 2.0, "loss": 0.5, "logps/chosen": -3.0})
    assert line.startswith("step 1/10 (10.0%) | loss 0.5 | grad_norm 2 | 1 s/step")
    clock.now += 1
    assert bar.update(2, {"custom": 7}).startswith("step 2/10 (20.0%) | custom 7 |")  # none known: all


def test_progress_bar_time_cadence_last_step_and_process(capsys, monkeypatch):
    clock = _Clock()
    bar = metrics.ProgressBar(5, tokens_per_step=None, every_steps=1000, every_seconds=30, clock=clock)
    clock.now += 10
    assert bar.update(1, {"loss": 1.0}) is None        # neither 1000 steps nor 30 s yet
    clock.now += 25
    assert bar.update(2, {"loss": 1.0}).endswith("ETA 0m52s")  # 35 s over 2 steps, 3 left
    clock.now += 1
    line = bar.update(5)                                 # the last step always prints
    assert line == "step 5/5 (100.0%) | 0.333 s/step | ETA 0m00s"
    assert capsys.readouterr().out.count("\n") == 2
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    quiet = metrics.ProgressBar(5, every_steps=1, clock=clock)
    clock.now += 1
    assert quiet.update(5) is None and capsys.readouterr().out == ""
