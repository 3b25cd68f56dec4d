"""The quick-start pieces one by one: tasks and rewards, the tokenizer, West-of-N selection and
datasets, sampling/scoring consistency, evaluation metrics, tables, plots, configs and sweeps."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from prefjax import models
from prefjax.batch import Batch
from prefjax.data import records, sources, tokenize
from prefjax.models.config import ModelConfig
from prefjax.quickstart import (
    evaluate,
    frontier,
    grid,
    label_noise,
    pipeline,
    plots,
    report,
    rollouts,
    tasks,
    vocab,
    west_of_n,
)
from prefjax.train import config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _config_module(name):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ tasks


def test_arithmetic_reward_is_exact_sum():
    task = tasks.get_task("arithmetic", max_operand=29)
    prompts = task.prompts(np.random.default_rng(0), 200)
    for p in prompts:
        a, b = (int(x) for x in p[:-1].split("+"))
        assert 0 <= a <= 29 and 0 <= b <= 29 and p.endswith("=")
        assert task.reward(p, str(a + b)) == 1.0
        assert task.reward(p, f" {a + b} ") == 1.0
        assert task.reward(p, str(a + b + 1)) == 0.0
        assert task.reward(p, "") == 0.0
    with pytest.raises(ValueError, match="'7-3=' is not a prompt"):
        task.reward("7-3=", "4")


def test_arithmetic_demonstrator_is_right_at_its_rate_and_slips_plausibly():
    task = tasks.get_task("arithmetic", p_correct=0.3)
    rng = np.random.default_rng(1)
    prompts = task.prompts(rng, 4000)
    answers = [int(task.demonstration(p, rng)) for p in prompts]
    sums = [sum(int(x) for x in p[:-1].split("+")) for p in prompts]
    diffs = np.asarray(answers) - np.asarray(sums)
    rate = np.mean(diffs == 0)
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    assert set(diffs[diffs != 0]) <= {-10, -2, -1, 1, 2, 10}
    assert min(answers) >= 0


def test_sentiment_reward_counts_the_lexicon():
    task = tasks.get_task("sentiment")
    p = "the film was "
    assert task.reward(p, "superb") == 1.0
    assert task.reward(p, "very great and quite dull") == 0.0
    assert task.reward(p, "awful but odd") == -0.5
    assert task.reward(p, "really") == 0.0 and task.reward(p, "") == 0.0
    with pytest.raises(ValueError, match="'the weather was ' is not a prompt"):
        task.reward("the weather was ", "great")


def test_sentiment_demonstrator_leans_by_subject():
    task = tasks.get_task("sentiment", max_clauses=1)
    rng = np.random.default_rng(2)
    # One clause: the reward is +1, -1 or 0, so its mean is P(positive) - P(negative).
    for subject, (p_pos, p_neg) in tasks.SUBJECTS.items():
        prompt = f"the {subject} was "
        mean = np.mean([task.reward(prompt, task.demonstration(prompt, rng)) for _ in range(3000)])
        assert abs(mean - (p_pos - p_neg)) < 0.06, subject


def test_get_task_errors_name_the_choices():
    with pytest.raises(KeyError, match="unknown task 'nope'.*arithmetic.*sentiment"):
        tasks.get_task("nope")
    with pytest.raises(ValueError, match="no option.*'digits'.*max_operand"):
        tasks.get_task("arithmetic", digits=3)
    with pytest.raises(ValueError, match="p_correct"):
        tasks.get_task("arithmetic", p_correct=1.5)


# ------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", ["arithmetic", "sentiment"])
def test_tokenizer_round_trips_and_matches_the_data_pipeline(name, tmp_path):
    task = tasks.get_task(name)
    tok = vocab.build(task, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0 and not tok.adds_bos
    assert tok.vocab_size == len(vocab.SPECIALS) + len(task.symbols())
    rng = np.random.default_rng(3)
    for prompt in task.prompts(rng, 20):
        response = task.demonstration(prompt, rng)
        ids = tok.encode(prompt + response, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(tok.encode(response, add_special_tokens=False)) == response
        # prefjax.data renders the West-of-N text rows as prompt + response + EOS: the layout
        # rollouts and SFT use.
        example = records.parse_row({"prompt": prompt, "chosen": response, "rejected": response + " x"
                                     if name == "sentiment" else response + "1"}, "pair",
                                    records.Location("pairs.jsonl", 1))
        tokenized = tokenize.tokenize_example(example, tok)
        np.testing.assert_array_equal(tokenized.prompt_ids, rollouts.encode(tok, [prompt])[0])
        np.testing.assert_array_equal(tokenized.response_ids[0], rollouts.encode(tok, [response])[0] + [1])


# --------------------------------------------------------------------------------- rollouts


def test_rows_from_sequences_layout():
    rows = Batch.from_sequences([[5, 6], [7]], [[8, 1], [9, 9, 1]], 6, pad_id=0)
    np.testing.assert_array_equal(rows.tokens, [[5, 6, 8, 1, 0, 0], [7, 9, 9, 1, 0, 0]])
    np.testing.assert_array_equal(rows.loss_mask, [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows.segments, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="row 0.*exceed the row length 3"):
        Batch.from_sequences([[5, 6]], [[8, 1]], 3, pad_id=0)


def test_scored_logps_match_the_samplers_own(tmp_path):
    task = tasks.get_task("arithmetic", max_operand=9)
    tok = vocab.build(task, tmp_path)
    cfg = ModelConfig(family="llama", vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=8)
    graphdef, params = models.init_params(cfg, seed=0, mesh=None)
    model = rollouts.Model(cfg, graphdef, params)
    prompts = task.prompts(np.random.default_rng(4), 12)
    out = rollouts.sample(model, tok, task, prompts, seed=0, batch_size=8)
    assert len(out) == 12 and all(len(r) <= task.max_response_tokens for r in out.response_ids)
    scored = rollouts.sequence_logps(model, out, pad_id=tok.pad_token_id, length=rollouts.row_length(task),
                                     batch_size=8)
    np.testing.assert_allclose(scored, out.logps, atol=1e-4)
    # `complete` means: ended with EOS and every other token is a task symbol.
    for ids, complete in zip(out.response_ids, out.complete):
        symbols = all(3 <= t < tok.vocab_size for t in ids[:-1])
        expected = len(ids) >= 2 and ids[-1] == tok.eos_token_id and symbols
        assert complete == expected


# -------------------------------------------------------------------------------- West-of-N


def _responses(prompts, texts, complete=None):
    return rollouts.Responses(list(prompts), [[0]] * len(prompts), [[0]] * len(prompts), list(texts),
                              np.ones(len(texts), bool) if complete is None else np.asarray(complete),
                              np.zeros(len(texts), np.float32))


def test_west_of_n_picks_best_and_worst_and_skips_ties():
    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    texts = ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3"]
    rewards = np.array([0.5, 0.9, 0.1, 1.0, 1.0, 1.0, 0.0, 0.7, 0.7])
    complete = [True, True, True, True, True, True, False, True, True]
    pairs = west_of_n.select(_responses(prompts, texts, complete), rewards, n=3)
    # "b" ties everywhere; "c"'s only lower response is incomplete, so its complete ones tie.
    assert pairs.prompts == ["a"] and pairs.chosen == ["a2"] and pairs.rejected == ["a3"]
    assert pairs.score_chosen == [0.9] and pairs.score_rejected == [0.1] and pairs.num_prompts == 3
    assert [t for t, _ in pairs.ranked[0]] == ["a2", "a1", "a3"]
    with pytest.raises(ValueError, match="not a multiple of n=4"):
        west_of_n.select(_responses(prompts, texts), rewards, n=4)


def test_west_of_n_datasets_load_as_prefjax_data(tmp_path):
    prompts = ["1+1="] * 4 + ["2+2="] * 4
    texts = ["2", "3", "12", "1", "4", "5", "3", "14"]
    task = tasks.get_task("arithmetic")
    pairs = west_of_n.select(_responses(prompts, texts), task.rewards(prompts, texts), n=4)
    assert len(pairs) == 2
    pair_source = sources.load_source(str(west_of_n.write_pairs(pairs, tmp_path / "p.jsonl")))
    assert len(pair_source) == 2 and pair_source[0]["kind"] == "pair" and pair_source[0]["format"] == "text"
    first = pair_source[0]
    prompt = first["prompt"][0]["content"]
    assert task.reward(prompt, first["chosen"][0]["content"]) == first["score_chosen"] == 1.0
    assert task.reward(prompt, first["rejected"][0]["content"]) == first["score_rejected"] == 0.0
    west_of_n.write_unpaired(pairs, tmp_path / "u.jsonl")
    unpaired = sources.load_source(str(tmp_path / "u.jsonl"))
    assert [e["label"] for e in unpaired] == [True, False, True, False]
    assert west_of_n.write_ranked(pairs, tmp_path / "r.jsonl", k=4) == 2
    ranked = sources.load_source(str(tmp_path / "r.jsonl"))
    assert ranked[0]["kind"] == "ranked" and ranked[0]["scores"][0] == 1.0
    assert len(ranked[0]["responses"]) == 4
    back = west_of_n.read_pairs(tmp_path / "p.jsonl")
    assert back.prompts == pairs.prompts and back.chosen == pairs.chosen
    assert back.score_rejected == pairs.score_rejected


def test_west_of_n_errors_name_the_file(tmp_path):
    empty = west_of_n.PairSet([], [], [], [], [], [], num_prompts=5)
    with pytest.raises(ValueError, match="no preference pairs"):
        west_of_n.write_pairs(empty, tmp_path / "p.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3", "score_chosen": 1,
                               "score_rejected": 0}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a West-of-N pair row \(KeyError"):
        west_of_n.read_pairs(bad)


def test_label_noise_flips_an_exact_nested_fraction_of_rows(tmp_path):
    rows = [{"prompt": f"{i}+0=", "chosen": str(i), "rejected": str(i + 1), "score_chosen": 1.0,
             "score_rejected": 0.0} for i in range(50)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flipped = {}
    for rate in (0.2, 0.4):
        assert west_of_n.write_flipped(source, tmp_path / f"f{rate}.jsonl", rate, seed=3) == round(rate * 50)
        out = [json.loads(line) for line in (tmp_path / f"f{rate}.jsonl").read_text().splitlines()]
        flipped[rate] = {i for i, (a, b) in enumerate(zip(rows, out)) if a != b}
        for i in flipped[rate]:  # a flip swaps the responses and their scores, nothing else
            assert (out[i]["chosen"], out[i]["score_chosen"]) == (rows[i]["rejected"], 0.0)
            assert out[i]["prompt"] == rows[i]["prompt"]
    assert len(flipped[0.2]) == 10 and flipped[0.2] <= flipped[0.4]
    unpaired = tmp_path / "u.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": "p", "completion": str(i), "label": True}) + "\n"
                                for i in range(10)))
    assert west_of_n.write_flipped(unpaired, tmp_path / "uf.jsonl", 0.3, seed=0) == 3
    labels = [json.loads(line)["label"] for line in (tmp_path / "uf.jsonl").read_text().splitlines()]
    assert labels.count(False) == 3


def test_best_of_n_curve():
    rewards = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    curve = pipeline.best_of_n_curve(rewards)
    assert [c["n"] for c in curve] == [1, 2, 4]
    assert [c["reward"] for c in curve] == [0.0, 0.5, 1.0]
    assert curve[0]["kl"] == 0.0 and curve[2]["kl"] == pytest.approx(math.log(4) - 0.75)


# ------------------------------------------------------------------------------- evaluation


def test_win_rate_and_pair_accuracy_count_ties_as_half():
    assert evaluate.win_rate([1, 0, 1, 0], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert evaluate.pair_accuracy([0.0, 0.0]) == 0.5
    assert evaluate.pair_accuracy([2.0, -1.0, 0.0, 3.0]) == pytest.approx(2.5 / 4)


# ---------------------------------------------------------------------------- tables, plots


def test_tables():
    text = report.table(["metric", "a"], [["reward", 0.12345], ["count", 7]])
    assert text.splitlines()[2] == "reward  0.123" and text.splitlines()[3] == "count       7"
    md = report.table(["m", "a"], [["x", None]], markdown=True)
    assert md.splitlines() == ["| m | a |", "|---|---:|", "| x | - |"]
    assert report.mean_and_spread([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert report.mean_and_spread([0.5]) == "0.500"
    with pytest.raises(ValueError, match="2 cells"):
        report.table(["a", "b"], [["x"]])


def _fake_results():
    results = []
    for seed in (0, 1):
        for loss, beta, reward, kl in (("dpo", 0.1, 0.7, 2.0), ("dpo", 1.0, 0.4, 0.3),
                                       ("ipo", 0.1, 0.6, 1.0)):
            tuned = {"reward": reward + 0.02 * seed, "reward_se": 0.02, "kl": kl, "win_rate": 0.6,
                     "reward_accuracy": 0.9}
            best_of_n = [{"n": 1, "kl": 0.0, "reward": 0.3}, {"n": 2, "kl": 0.19, "reward": 0.5}]
            results.append({"name": f"loss_name={loss},loss.beta={beta}", "seed": seed,
                            "overrides": {"loss_name": loss, "loss.beta": beta},
                            "sft": {"reward": 0.3, "reward_se": 0.01}, "tuned": tuned,
                            "best_of_n": best_of_n})
    return results


def test_frontier_outputs(tmp_path):
    results = _fake_results()
    rows = frontier.aggregate(results)
    assert [r["name"] for r in rows] == ["loss_name=dpo,loss.beta=0.1", "loss_name=dpo,loss.beta=1.0",
                                         "loss_name=ipo,loss.beta=0.1"]
    assert rows[0]["reward"] == pytest.approx(0.71) and rows[0]["reward_values"] == [0.7, 0.72]
    files = frontier.write_outputs(results, tmp_path, reward_range=(0.0, 1.0))
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = files["table"].read_text()
    assert "| dpo | 0.1 | 0.710 | 2.000 |" in table and "SFT (reference)" in table


def test_label_noise_table_and_plot(tmp_path):
    results = []
    for seed in (0, 1):
        for loss, smoothing, eps, reward in (("dpo", 0.0, 0.0, 0.8), ("dpo", 0.0, 0.2, 0.6),
                                             ("dpo", 0.2, 0.2, 0.65), ("robust_dpo", 0.2, 0.2, 0.75)):
            results.append({"seed": seed, "overrides": {"loss_name": loss, "loss.label_smoothing": smoothing,
                                                        "tune.label_noise": eps},
                            "sft": {"reward": 0.3}, "tuned": {"reward": reward + 0.1 * seed}})
    values = label_noise.collect(results)
    assert values["cDPO"] == {0.2: [0.65, 0.75]} and values["DPO"][0.0] == [0.8, 0.9]
    lines = label_noise.table(results, markdown=True).splitlines()
    assert lines[0] == "| reward by flip rate | 0% flipped | 20% flipped |"
    assert lines[2] == "| SFT (reference) | 0.300 ± 0.000 | 0.300 ± 0.000 |"
    assert lines[3] == "| DPO | 0.850 ± 0.071 | 0.650 ± 0.071 |"
    assert lines[-1] == "| robust DPO | - | 0.800 ± 0.071 |"
    assert label_noise.plot(results, tmp_path / "n.png").stat().st_size > 1000


def test_training_curves_plot(tmp_path):
    sft_history = [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}]
    tune_records = [{"step": 1, "loss": 0.69, "rewards/accuracies": 0.5}, {"step": 2, "loss": 0.6}]
    path = plots.training_curves(sft_history, tune_records, tmp_path / "curves.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ configs


def test_quickstart_config_arguments():
    module = _config_module("quickstart")
    config = module.get_config()
    assert config.job == "quickstart" and config.loss_name == "dpo" and config.loss.to_dict() == {"beta": 0.1}
    from prefjax.losses import registry

    ipo = module.get_config("ipo")
    assert ipo.loss_name == "ipo" and ipo.loss.to_dict() == registry.get("ipo").hparam_defaults
    small = module.get_config("small,kto")
    assert small.loss_name == "kto" and small.task == "sentiment" and small.total_steps < config.total_steps
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        module.get_config("nope")
    with pytest.raises(KeyError, match="at most one loss"):
        module.get_config("dpo,ipo")


def _fake_prepared(tmp_path, task_name="arithmetic", ranked_rows=3):
    return pipeline.Prepared(folder=tmp_path, task=tasks.get_task(task_name), tokenizer=None,
                             sft_folder=tmp_path / "sft" / "model", sft_model=None, sft_history=[],
                             heldout=None, best_of_n=[], stats={"ranked_rows": ranked_rows})


@pytest.mark.parametrize("loss_name,data_file,reference", [("dpo", "train.jsonl", "frozen"),
                                                           ("kto", "train_unpaired.jsonl", "frozen"),
                                                           ("simpo", "train.jsonl", "none"),
                                                           ("plackett_luce", "train_ranked.jsonl", "frozen")])
def test_trainer_config_points_at_the_sft_model_and_the_right_data(loss_name, data_file, reference, tmp_path):
    config = _config_module("quickstart").get_config()
    config.loss_name = loss_name
    c = pipeline.trainer_config(config, _fake_prepared(tmp_path))
    assert c.model.hf_folder == str(tmp_path / "sft" / "model") and c.reference.kind == reference
    assert c.data.source == str(tmp_path / "pairs" / data_file) and c.total_steps == config.total_steps
    config_lib.validate(c, num_devices=jax.device_count())


def test_trainer_config_errors(tmp_path):
    config = _config_module("quickstart").get_config()
    config.loss_name = "nope"
    with pytest.raises(KeyError, match="'nope' is not a registered loss"):
        pipeline.trainer_config(config, _fake_prepared(tmp_path))
    config.loss_name = "lipo"
    with pytest.raises(ValueError, match="list_size"):
        pipeline.trainer_config(config, _fake_prepared(tmp_path, ranked_rows=0))


@pytest.mark.parametrize("name", ["quickstart_frontier", "quickstart_label_noise"])
def test_sweeps_only_change_tuning_and_apply_to_the_config(name):
    module = _config_module(name)
    base = module.get_config()
    runs = grid.expand(module)
    assert len({grid.run_name(o) for o in runs}) == len(runs)
    for overrides in runs:
        config = grid.configure(base, overrides)
        assert pipeline.prepare_settings(config) == pipeline.prepare_settings(base)
        from prefjax.losses import registry

        assert set(config.loss.to_dict()) <= set(registry.get(config.loss_name).hparam_defaults)
    try:  # the launcher of another part of the project expands the same sweeps
        from launch import sweep as launch_sweep
    except ImportError:
        return
    _, launched = launch_sweep.expand(str(CONFIGS / f"{name}.py"))
    assert [dict(r.overrides) for r in launched] == runs


def test_frontier_sweep_covers_five_losses_and_label_noise_three_methods_at_two_rates():
    frontier_runs = grid.expand(_config_module("quickstart_frontier"))
    losses = {o["loss_name"] for o in frontier_runs}
    assert {"dpo", "ipo", "simpo", "robust_dpo", "kto"} <= losses
    assert all(len({o["loss.beta"] for o in frontier_runs if o["loss_name"] == loss}) >= 3 for loss in losses)
    noise_runs = grid.expand(_config_module("quickstart_label_noise"))
    methods = {(label_noise.method_of(o), o["tune.label_noise"]) for o in noise_runs}
    assert {(m, eps) for m in ("DPO", "cDPO", "robust DPO") for eps in (0.2, 0.4)} <= methods
    for o in noise_runs:  # cDPO and robust DPO are told the true flip rate
        if label_noise.method_of(o) != "DPO":
            assert o["loss.label_smoothing"] == o["tune.label_noise"]


def test_grid_rejects_unknown_keys():
    config = _config_module("quickstart").get_config()
    with pytest.raises(KeyError, match="no key 'loss.gamma'"):
        grid.configure(config, {"loss.gamma": 1.0})


def test_experiment_seeds_flag_parses_and_names_itself_when_wrong():
    assert grid.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(SystemExit, match="--seeds='a,1'"):
        grid.parse_seeds("a,1")
