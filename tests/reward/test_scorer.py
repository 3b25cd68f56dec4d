"""prefjax.reward.score / score_ids / load / load_implicit against independent computations:
the head on the last token's hidden state, beta times a numpy log-ratio, the same scores
whatever the batching, padding side, mesh or number of processes, and the named errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from prefjax import models, reward
from prefjax.data.records import DataError
from prefjax.models import hf_checkpoint
from prefjax.reward import batching
from prefjax.sharding import make_mesh
from tests.reward import tiny_models

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["hello there", "what is the time", "tell me a story about a cat", "hi", "why",
           "please write a long and winding answer about the sea and its many tides", "ok", "sum 2 and 3", "x"]
# Plain text is concatenated without a separator (the trainer's rendering): responses start with a space.
RESPONSES = [" fine thanks", " noon", " once upon a time a cat sat", " hey", " because it is so and that is that",
             " the sea", " sure thing, here it is", " 5", " y z"]


_apply = jax.jit(models.apply, static_argnums=0)  # op by op, a forward takes seconds


def _hidden(ck, ids: np.ndarray) -> np.ndarray:
    hidden, _ = _apply(ck.graphdef, ck.params, ids[None].astype(np.int32))
    return np.asarray(hidden[0], np.float64)


def _plain_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """BOS + prompt + response + EOS as the trainer renders plain text; and the prompt's length."""
    bos = [tokenizer.bos_token_id] if tokenizer.adds_bos else []
    prompt_ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
    full = bos + tokenizer.encode(prompt + response, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert full[:len(prompt_ids)] == prompt_ids  # the test's prompts split cleanly
    return full, len(prompt_ids)


# --------------------------------------------------------------------------- explicit rewards

def test_score_is_the_head_on_the_hidden_state_of_the_eos_token():
    rm, ck = tiny_models.shared_explicit(), tiny_models.fixture()
    got = reward.score(rm, PROMPTS[:3], RESPONSES[:3])
    assert got.shape == (3, 2) and got.dtype == np.float32
    for i in range(3):
        ids, _ = _plain_ids(ck.tokenizer, PROMPTS[i], RESPONSES[i])
        want = _hidden(ck, np.asarray(ids))[-1] @ rm.head.astype(np.float64)  # read at the appended EOS
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
    # Reading one token earlier (before the EOS) gives something else: the test can tell.
    ids, _ = _plain_ids(ck.tokenizer, PROMPTS[0], RESPONSES[0])
    assert not np.allclose(got[0], _hidden(ck, np.asarray(ids))[-2] @ rm.head, atol=1e-3)


def test_message_lists_are_scored_through_the_chat_template_at_the_end_of_turn_token():
    rm, ck = tiny_models.shared_explicit(), tiny_models.fixture()
    prompt = [{"role": "user", "content": "hello there"}]
    response = [{"role": "assistant", "content": "fine thanks"}]
    got = reward.score(rm, [prompt], [response])
    text = ck.tokenizer.apply_chat_template(prompt + response)  # '<s>[INST] ... [/INST] ... </s>'
    ids = ck.tokenizer.encode(text, add_special_tokens=False)
    assert ids[-1] == ck.tokenizer.eos_token_id
    np.testing.assert_allclose(got[0], _hidden(ck, np.asarray(ids))[-1] @ rm.head, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, reward.score(rm, ["hello there"], ["fine thanks"]), atol=1e-3)


def test_batching_bucketing_and_order_do_not_change_scores():
    rm = tiny_models.shared_explicit()
    one_by_one = np.concatenate([reward.score(rm, [p], [r], batch_size=1) for p, r in zip(PROMPTS, RESPONSES)])
    for batch_size in (3, 7):  # (and 1 above)
        np.testing.assert_allclose(reward.score(rm, PROMPTS, RESPONSES, batch_size=batch_size), one_by_one,
                                   rtol=1e-5, atol=1e-6)
    order = np.random.default_rng(0).permutation(len(PROMPTS))
    permuted = reward.score(rm, [PROMPTS[i] for i in order], [RESPONSES[i] for i in order], batch_size=3)
    np.testing.assert_allclose(permuted, one_by_one[order], rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(one_by_one[:, 0], 4))) == len(PROMPTS)  # rows really differ


def test_one_compiled_program_per_bucket_and_batch_shape():
    rm = tiny_models.explicit()
    lengths = [len(rm.tokenizer.encode(p + r)) + 1 for p, r in zip(PROMPTS, RESPONSES)]
    buckets = batching.bucket_lengths(rm.context)
    assert buckets == (16, 32, 64)
    used = {next(b for b in buckets if b >= n) for n in lengths}
    assert len(used) >= 2  # the test's rows span several buckets
    reward.score(rm, PROMPTS, RESPONSES, batch_size=2)  # several batches per bucket, a short last one
    program, _ = rm.program(None)
    assert program._cache_size() == len(used)


def test_bucket_plan_covers_every_row_once_with_fixed_shapes():
    chunks = batching.plan([3, 40, 17, 16, 64, 5, 33], batching.bucket_lengths(64), batch_size=2, multiple=4)
    assert sorted(i for c in chunks for i in c.indices) == list(range(7))
    assert [(c.length, c.indices, c.rows) for c in chunks] == [
        (16, (0, 3), 4), (16, (5,), 4), (32, (2,), 4), (64, (1, 4), 4), (64, (6,), 4)]
    assert batching.bucket_lengths(100) == (16, 32, 64, 100)


def test_score_ids_reads_the_last_attended_token_left_or_right_padded():
    rm, ck = tiny_models.shared_explicit(), tiny_models.fixture()
    seqs = [_plain_ids(ck.tokenizer, p, r)[0] for p, r in zip(PROMPTS[:4], RESPONSES[:4])]
    t = max(map(len, seqs)) + 3
    right, left = np.full((4, t), 3), np.full((4, t), 3)
    right_mask, left_mask = np.zeros((4, t), int), np.zeros((4, t), int)
    for i, s in enumerate(seqs):
        right[i, :len(s)], right_mask[i, :len(s)] = s, 1
        left[i, t - len(s):], left_mask[i, t - len(s):] = s, 1
    from_right = reward.score_ids(rm, right, right_mask)
    from_left = reward.score_ids(rm, left, left_mask)
    np.testing.assert_allclose(from_left, from_right, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_right, reward.score(rm, PROMPTS[:4], RESPONSES[:4]), rtol=1e-5, atol=1e-6)


def test_normalize_applies_the_stored_mean_and_std():
    stats = {"mean": [0.5, -1.0], "std": [2.0, 4.0]}
    raw = reward.score(tiny_models.explicit(), PROMPTS[:2], RESPONSES[:2])
    got = reward.score(tiny_models.explicit(normalization=stats), PROMPTS[:2], RESPONSES[:2], normalize=True)
    np.testing.assert_allclose(got, (raw - np.array([0.5, -1.0])) / np.array([2.0, 4.0]), rtol=1e-6)


# --------------------------------------------------------------------------- implicit rewards

def _numpy_logps(ck_params, ids: list[int], num_prompt: int) -> float:
    ck = tiny_models.fixture()
    hidden, _ = _apply(ck.graphdef, ck_params, np.asarray([ids], np.int32))
    logits = np.asarray(hidden[0], np.float64) @ np.asarray(models.unembedding(ck.graphdef, ck_params), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    # token t (a response token) is predicted at position t - 1
    return float(sum(logits[t - 1, ids[t]] - logz[t - 1] for t in range(num_prompt, len(ids))))


def test_implicit_reward_is_beta_times_the_log_ratio():
    irm, ck = tiny_models.implicit(beta=0.25), tiny_models.fixture()
    got = reward.score(irm, PROMPTS[:3], RESPONSES[:3], batch_size=2)
    assert got.shape == (3, 1) and irm.labels == ("implicit_reward",)
    for i in range(3):
        ids, num_prompt = _plain_ids(ck.tokenizer, PROMPTS[i], RESPONSES[i])
        want = 0.25 * (_numpy_logps(tiny_models.policy_params(), ids, num_prompt)
                       - _numpy_logps(ck.params, ids, num_prompt))
        np.testing.assert_allclose(got[i, 0], want, rtol=1e-3, atol=1e-4)
    assert np.all(np.abs(got) > 1e-3)  # policy and reference really differ
    # score_ids with the response mask gives the same
    ids, num_prompt = _plain_ids(ck.tokenizer, PROMPTS[0], RESPONSES[0])
    response_mask = np.r_[np.zeros(num_prompt), np.ones(len(ids) - num_prompt)][None]
    np.testing.assert_allclose(reward.score_ids(irm, np.asarray([ids]), np.ones((1, len(ids))),
                                                response_mask=response_mask), got[:1], rtol=1e-5, atol=1e-6)


def test_load_implicit_from_folders_and_load_explicit_from_an_export(tmp_path):
    ck = tiny_models.fixture()
    hf_checkpoint.save(tmp_path / "policy", ck.cfg, tiny_models.policy_params(), copy_from=tiny_models.FIXTURE)
    irm = reward.load_implicit(str(tmp_path / "policy"), str(tiny_models.FIXTURE), beta=0.25)
    np.testing.assert_allclose(reward.score(irm, PROMPTS[:2], RESPONSES[:2]),
                               reward.score(tiny_models.implicit(beta=0.25), PROMPTS[:2], RESPONSES[:2]),
                               rtol=1e-5, atol=1e-6)
    rm = tiny_models.explicit(labels=("reward",))
    hf_checkpoint.save_reward_model(tmp_path / "rm", ck.cfg, ck.params, rm.head, labels=("reward",), pad_token_id=3,
                                    copy_from=tiny_models.FIXTURE)
    loaded = reward.load(str(tmp_path / "rm"))
    assert loaded.labels == ("reward",) and loaded.normalization is None
    np.testing.assert_allclose(reward.score(loaded, PROMPTS[:2], RESPONSES[:2]),
                               reward.score(rm, PROMPTS[:2], RESPONSES[:2]), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- meshes and processes

def test_sharded_on_an_8_device_mesh_equals_unsharded():
    assert jax.device_count() >= 8  # tests/conftest.py asks for 8 CPU devices
    rm, irm = tiny_models.shared_explicit(), tiny_models.implicit()
    np.testing.assert_allclose(reward.score(rm, PROMPTS[:4], RESPONSES[:4], mesh=make_mesh({"data": 8})),
                               reward.score(rm, PROMPTS[:4], RESPONSES[:4]), rtol=1e-5, atol=1e-5)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # parameters split too
    np.testing.assert_allclose(reward.score(irm, PROMPTS[:2], RESPONSES[:2], mesh=mesh),
                               reward.score(irm, PROMPTS[:2], RESPONSES[:2]), rtol=1e-4, atol=1e-5)


_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    num_processes, process_id, port, out, policy = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=60)
    from prefjax import reward
    from prefjax.models import hf_checkpoint
    from prefjax.sharding import make_mesh
    from tests.reward import test_scorer as t, tiny_models
    mesh = make_mesh({"data": -1})
    ck = hf_checkpoint.load(tiny_models.FIXTURE, mesh=mesh)
    rm = reward.RewardModel(ck.cfg, ck.graphdef, ck.params, tiny_models.head(), tiny_models.LABELS, ck.tokenizer,
                            mesh=mesh)
    irm = reward.load_implicit(policy, str(tiny_models.FIXTURE), beta=0.1, mesh=mesh)
    explicit = reward.score(rm, t.PROMPTS[:5], t.RESPONSES[:5], batch_size=3)
    implicit = reward.score(irm, t.PROMPTS[:2], t.RESPONSES[:2])
    json.dump({"explicit": explicit.tolist(), "implicit": implicit.tolist(), "devices": jax.device_count()},
              open(out, "w"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1"
    return env


@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(_PROCESS_SCRIPT)
    policy = tmp_path / "policy"
    hf_checkpoint.save(policy, tiny_models.fixture().cfg, tiny_models.policy_params(), copy_from=tiny_models.FIXTURE)
    port = str(_free_port())
    subprocess.run([sys.executable, str(script), "1", "0", port, str(tmp_path / "one.json"), str(policy)], cwd=ROOT,
                   env=_env(4), check=True, capture_output=True, timeout=240)
    procs = [subprocess.Popen([sys.executable, str(script), "2", str(i), port, str(tmp_path / f"two{i}.json"),
                               str(policy)],
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["devices"] == 4
    for i in range(2):
        two = json.loads((tmp_path / f"two{i}.json").read_text())
        assert two["devices"] == 4  # a global mesh over both processes' devices
        np.testing.assert_allclose(two["explicit"], one["explicit"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(two["implicit"], one["implicit"], rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(np.asarray(one["implicit"])) > 1e-3)  # the rewards are not trivially equal


# --------------------------------------------------------------------------- named errors

def test_a_row_longer_than_the_context_is_a_named_error():
    rm = tiny_models.explicit()
    with pytest.raises(reward.ContextLengthError) as err:
        reward.score(rm, ["hi", "hello " * 40], ["a", "b"])
    message = str(err.value)
    assert "score() input:1: prompt + completion is" in message and "longer than the limit of 64" in message
    assert "tiny-rm" in message and "max_len" in message
    with pytest.raises(reward.ContextLengthError, match=r"limit of 8 \(max_len\)"):
        reward.score(rm, ["hello there"], ["fine thanks"], max_len=8)


def test_bad_arguments_are_named_errors():
    rm = tiny_models.explicit()
    with pytest.raises(reward.ScoreInputError, match="2 prompts but 1 responses"):
        reward.score(rm, ["a", "b"], ["c"])
    with pytest.raises(reward.ScoreInputError, match="not one string"):
        reward.score(rm, "a", "b")
    with pytest.raises(DataError, match=r"score\(\) input, index 1: field 'completion\[0\]\.content'"):
        reward.score(rm, ["a", "b"], ["c", [{"role": "user"}]])
    with pytest.raises(reward.NoNormalizationError, match="stores none.*reward.normalize=True"):
        reward.score(rm, ["a"], ["b"], normalize=True)
    with pytest.raises(reward.ScoreInputError, match="row 0's attention_mask has holes"):
        reward.score_ids(rm, np.ones((1, 4), int), np.array([[1, 0, 1, 1]]))
    with pytest.raises(reward.ScoreInputError, match="pass response_mask="):
        reward.score_ids(tiny_models.implicit(), np.ones((1, 4), int), np.ones((1, 4), int))
    with pytest.raises(reward.RewardModelError, match=r"head has shape \[64, 2\].*num_labels=1"):
        reward.RewardModel(rm.cfg, rm.graphdef, rm.params, rm.head, ("reward",), rm.tokenizer)
    with pytest.raises(reward.RewardModelError, match="beta must be a number > 0"):
        tiny_models.implicit(beta=0.0)


def test_load_implicit_refuses_tokenizers_that_differ():
    qwen3 = tiny_models.FIXTURE.parent / "qwen3"
    with pytest.raises(reward.TokenizerMismatchError) as err:
        reward.load_implicit(str(tiny_models.FIXTURE), str(qwen3), beta=0.1)
    message = str(err.value)
    assert f"policy='{tiny_models.FIXTURE}'" in message and f"reference='{qwen3}'" in message
    assert "different tokenizers" in message and "same token ids" in message


def test_load_refuses_a_causal_lm_folder_and_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not a reward model.*load_implicit"):
        reward.load(str(tiny_models.FIXTURE))
    with pytest.raises(ValueError, match="no such folder"):
        reward.load(str(tmp_path / "nope"))


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2_multi"])
def test_the_public_api_reproduces_transformers_scores_on_the_committed_fixtures(name):
    """prefjax.reward.load + score_ids on transformers' own rows (unpadded, right- and left-padded):
    the product path, not only the model, matches *ForSequenceClassification's float32 scores."""
    folder = Path(__file__).resolve().parents[1] / "fixtures" / "hf_reward" / name
    expected = np.load(folder / "expected.npz")
    rm = reward.load(str(folder))
    got = reward.score_ids(rm, expected["input_ids"], expected["attention_mask"])
    assert got.shape == expected["logits"].shape
    np.testing.assert_allclose(got, expected["logits"], atol=1e-4, rtol=0)
