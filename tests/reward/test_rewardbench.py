"""RewardBench-format evaluation: the pure scores, the reader's errors and the command line.

The committed fixture tests/fixtures/data/rewardbench_tiny.jsonl (18 pairs, 9 subsets, in mixed
order, one subset outside RewardBench's map) is written so that a "reward" equal to the
response's length in characters gives known outcomes: the expectations below are counted by
hand from the file, not taken from a run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from prefjax import reward
from prefjax.data.records import DataError
from prefjax.reward import rewardbench as rb

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "rewardbench_tiny.jsonl"

# Counted from the fixture with reward = len(response): (wins, ties, pairs) per subset.
BY_HAND = {"alpacaeval-easy": (3, 0, 4), "mt-bench-easy": (0, 0, 2), "llmbar-natural": (1, 1, 2),
           "xstest-should-respond": (3, 0, 3), "donotanswer": (0, 0, 1), "math-prm": (1, 0, 1),
           "hep-python": (1, 0, 2), "hep-go": (0, 0, 1), "my-subset": (2, 0, 2)}


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

def test_subset_accuracies_counts_wins_ties_and_losses():
    chosen = [2.0, 1.0, 0.5, 3.0, -1.0, 4.0]
    rejected = [1.0, 1.0, 0.7, 3.0, -2.0, 5.0]
    subsets = ["b", "a", "a", "b", "a", "c"]
    got = rb.subset_accuracies(np.float32(chosen), np.float32(rejected), subsets)
    assert list(got) == ["b", "a", "c"]  # first appearance
    # b: win + tie = 1.5 / 2; a: tie + loss + win = 1.5 / 3; c: loss
    assert got["b"] == {"accuracy": 0.75, "count": 2, "ties": 1}
    assert got["a"] == {"accuracy": 0.5, "count": 3, "ties": 1}
    assert got["c"] == {"accuracy": 0.0, "count": 1, "ties": 0}


def test_subset_accuracies_rejects_bad_rewards():
    with pytest.raises(ValueError, match=r"1 of 2 pairs have a non-finite reward \(first: pair 1, "
                                         r"chosen nan"):
        rb.subset_accuracies([1.0, float("nan")], [0.0, 0.0], ["a", "a"])
    with pytest.raises(ValueError, match=r"one chosen and one rejected reward per subset entry"):
        rb.subset_accuracies([1.0, 2.0], [0.0, 0.0], ["a"])


def _results(**subsets: tuple[float, int]) -> dict:
    return {name.replace("_", "-"): {"accuracy": acc, "count": n, "ties": 0}
            for name, (acc, n) in subsets.items()}


def test_section_scores_are_count_weighted():
    results = _results(alpacaeval_easy=(1.0, 30), mt_bench_med=(0.5, 10), donotanswer=(0.25, 4),
                       my_own=(0.9, 7), hep_go=(0.0, 5), math_prm=(1.0, 5))
    got = rb.section_scores(results)
    assert list(got) == ["Chat", "Safety", "Reasoning", "Other"]
    # Chat: (30 * 1.0 + 10 * 0.5) / 40 = 0.875 (an unweighted mean would be 0.75)
    assert got["Chat"]["accuracy"] == pytest.approx(0.875)
    assert got["Chat"]["count"] == 40 and got["Chat"]["subsets"] == ["alpacaeval-easy", "mt-bench-med"]
    assert got["Safety"]["accuracy"] == pytest.approx(0.25)
    assert got["Reasoning"]["subsets"] == ["math-prm", "hep-go"]  # RewardBench's order, not the input's
    assert got["Reasoning"]["accuracy"] == pytest.approx(0.5)
    assert got["Other"] == {"accuracy": pytest.approx(0.9), "count": 7, "subsets": ["my-own"]}
    # Overall: the mean of Chat, Safety and Reasoning; Other is left out.
    assert rb.overall_score(got) == pytest.approx((0.875 + 0.25 + 0.5) / 3)
    assert rb.overall_score({"Other": got["Other"]}) is None
    text = rb.format_report({"subsets": {"my-own": results["my-own"]}, "sections": {"Other": got["Other"]},
                             "overall": None, "weighting": "count"})
    assert "no RewardBench section is present, so there is no overall score" in text


def test_leaderboard_weighting_gives_math_the_weight_of_all_code():
    results = _results(math_prm=(0.9, 10), hep_go=(0.5, 20), hep_cpp=(0.2, 20), alpacaeval_hard=(0.6, 8))
    count = rb.section_scores(results, "count")
    board = rb.section_scores(results, "leaderboard")
    assert count["Reasoning"]["accuracy"] == pytest.approx((9 + 10 + 4) / 50)
    # math-prm weighs 40 (the hep-* pairs), so Reasoning = mean(math, code) = (0.9 + 0.35) / 2
    assert board["Reasoning"]["accuracy"] == pytest.approx((0.9 + 0.35) / 2)
    assert board["Reasoning"]["count"] == 50  # the real number of pairs
    assert board["Chat"] == count["Chat"]
    # Math alone: nothing to upweight against.
    alone = rb.section_scores(_results(math_prm=(0.3, 4)), "leaderboard")
    assert alone["Reasoning"]["accuracy"] == pytest.approx(0.3)


def test_unknown_weighting_is_named():
    with pytest.raises(rb.RewardBenchError, match=r"weighting must be one of count, leaderboard, got "
                                                  r"'leaderbord' \(did you mean leaderboard\?\)"):
        rb.section_scores({}, "leaderbord")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def test_read_bench_reads_the_fixture_in_file_order():
    bench = rb.read_bench(FIXTURE)
    assert len(bench) == 18 and bench.files == (str(FIXTURE),)
    assert bench.examples[0]["prompt"] == [{"role": "user", "content": "Name a primary colour."}]
    assert bench.examples[1]["chosen"] == [{"role": "assistant", "content": "5."}]
    assert bench.examples[2]["source"] == f"{FIXTURE}:3"
    assert {name: bench.subsets.count(name) for name in BY_HAND} == {k: v[2] for k, v in BY_HAND.items()}
    picked = bench.select(["hep-go", "my-subset"])
    assert picked.subsets == ["my-subset", "hep-go", "my-subset"]
    rejected = [e["rejected"][0]["content"] for e in picked.examples]
    assert rejected == ["One.", "func one() int {\n\treturn 1 + 0\n}", "Sea."]


def test_read_bench_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "rb.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "donotanswer"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": None}) + "\n")
    with pytest.raises(DataError, match=rf"{path}, line 2: field 'rejected': missing; RewardBench rows need "
                                        r"prompt, chosen, rejected, subset"):
        rb.read_bench(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "subset"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'subset': missing"):
        rb.read_bench(path)
    path.write_text(json.dumps({**good, "subset": 7}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'subset': must be a non-empty subset name, got 7"):
        rb.read_bench(path)
    # The trainer's pair checks (prefjax.data.records), with the same file and line.
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": 3}) + "\n")
    with pytest.raises(DataError, match=r"line 2: field 'chosen': must be text or a list of messages, "
                                        r"got int"):
        rb.read_bench(path)
    path.write_text(json.dumps({**good, "rejected": "  "}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'rejected': empty"):
        rb.read_bench(path)
    path.write_text("\n\n")
    with pytest.raises(rb.RewardBenchError, match=rf"^{path}: no rows; expected RewardBench rows with "
                                                  r"prompt, chosen, rejected, subset$"):
        rb.read_bench(path)


def test_read_bench_reads_parquet_and_names_its_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:3]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    bench = rb.read_bench(tmp_path / "rb.parquet")
    assert [e["chosen"][0]["content"] for e in bench.examples] == [r["chosen"] for r in rows]
    assert bench.subsets == [r["subset"] for r in rows]
    rows[1]["prompt"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet, row 2: field 'prompt': missing"):
        rb.read_bench(tmp_path / "bad.parquet")


def test_select_unknown_subset_suggests_one():
    bench = rb.read_bench(FIXTURE)
    with pytest.raises(rb.RewardBenchError, match=r"--subsets: 'hep-pyton' is not a subset of "
                                                  r".*rewardbench_tiny\.jsonl \(did you mean hep-python\?\); "
                                                  r"it has: alpacaeval-easy, "):
        bench.select(["hep-python", "hep-pyton"])


# ---------------------------------------------------------------------------------------------
# Command line, with a stand-in model whose reward is the response's length
# ---------------------------------------------------------------------------------------------

class _LengthModel:
    """Reward = len(response) in characters; with two outputs, the second is its negation."""

    def __init__(self, labels=("reward",)):
        self.labels = labels
        self.calls = []


@pytest.fixture
def length_model(monkeypatch):
    model = _LengthModel()
    loaded = []

    def load(name, *, mesh=None, key="model"):
        loaded.append(("load", name, key))
        model.mesh = mesh
        return model

    def load_implicit(policy, ref, *, beta, mesh=None, keys=("policy", "reference")):
        loaded.append(("load_implicit", policy, ref, beta, keys))
        model.mesh = mesh
        return model

    def score_examples(m, examples, *, batch_size=32, mesh=None, **kwargs):
        assert mesh is m.mesh  # scored on the mesh the model was loaded on
        m.calls.append((list(examples), batch_size))
        out = []
        for example in examples:
            lengths = np.array([sum(len(msg["content"]) for msg in example[side])
                                for side in ("chosen", "rejected")], np.float32)
            out.append(np.stack([lengths, -lengths][:len(m.labels)], axis=1))  # [2, L]
        return out

    for name, fn in (("load", load), ("load_implicit", load_implicit), ("score_examples", score_examples)):
        monkeypatch.setattr(reward, name, fn)
    model.loaded = loaded
    return model


def _expected_accuracy(name: str) -> float:
    wins, ties, n = BY_HAND[name]
    return (wins + 0.5 * ties) / n


def test_cli_end_to_end_with_length_reward(length_model, tmp_path, capsys):
    out = tmp_path / "out" / "rb.json"
    code = rb.main(["--model", "some/rm", "--data", str(FIXTURE), "--json", str(out), "--batch-size", "5"])
    assert code == 0
    examples, batch_size = length_model.calls[0]
    assert len(length_model.calls) == 1 and batch_size == 5 and len(examples) == 18
    assert length_model.loaded == [("load", "some/rm", "--model")]
    assert length_model.mesh.devices.size == jax.device_count() > 1  # all devices on the data axis
    result = json.loads(out.read_text())
    assert result["model"] == "some/rm" and "reference" not in result and result["label"] == "reward"
    assert {k: (v["accuracy"], v["count"], v["ties"]) for k, v in result["subsets"].items()} == {
        k: (_expected_accuracy(k), n, ties) for k, (_, ties, n) in BY_HAND.items()}
    sections = {k: (v["accuracy"], v["count"]) for k, v in result["sections"].items()}
    # Chat (3 + 0) / 6, Chat Hard 1.5 / 2, Safety 3 / 4, Reasoning (1 + 1 + 0) / 4, Other 2 / 2
    assert sections == {"Chat": (0.5, 6), "Chat Hard": (0.75, 2), "Safety": (0.75, 4), "Reasoning": (0.5, 4),
                        "Other": (1.0, 2)}
    assert result["overall"] == pytest.approx((0.5 + 0.75 + 0.75 + 0.5) / 4)
    assert result["sections"]["Other"]["subsets"] == ["my-subset"]
    text = capsys.readouterr().out
    assert "RewardBench: 18 pairs from" in text and "my-subset" in text
    assert ("Other: subsets outside RewardBench's section map (my-subset); reported, not in the overall "
            "score.") in text
    assert "overall is the mean of the 4 RewardBench section(s) present" in text


def test_cli_leaderboard_subsets_and_implicit(length_model, tmp_path):
    out = tmp_path / "rb.json"
    code = rb.main(["--model", "dpo", "--reference", "sft", "--beta", "0.1", "--data", str(FIXTURE),
                    "--json", str(out), "--subsets", "math-prm,hep-python,hep-go,donotanswer",
                    "--reasoning-weighting", "leaderboard"])
    assert code == 0
    assert length_model.loaded == [("load_implicit", "dpo", "sft", 0.1, ("--model", "--reference"))]
    assert len(length_model.calls[0][0]) == 5
    result = json.loads(out.read_text())
    assert (result["reference"], result["beta"], result["weighting"]) == ("sft", 0.1, "leaderboard")
    assert list(result["sections"]) == ["Safety", "Reasoning"]
    # math-prm (1.0) weighs 3, as hep-python + hep-go (1 win of 3): (3 + 1) / 6
    assert result["sections"]["Reasoning"]["accuracy"] == pytest.approx(4 / 6)
    assert result["overall"] == pytest.approx((0.0 + 4 / 6) / 2)


def test_cli_multi_output_model_needs_label(length_model, tmp_path, capsys):
    length_model.labels = ("helpfulness", "brevity")
    assert rb.main(["--model", "rm", "--data", str(FIXTURE)]) == 2
    assert capsys.readouterr().err.strip() == ("error: the model has 2 reward outputs (helpfulness, "
                                               "brevity); RewardBench compares one: name it with --label")
    assert rb.main(["--model", "rm", "--data", str(FIXTURE), "--label", "brevty"]) == 2
    assert "did you mean brevity?" in capsys.readouterr().err
    out = tmp_path / "rb.json"
    assert rb.main(["--model", "rm", "--data", str(FIXTURE), "--label", "brevity", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # brevity = -length: every strict win above becomes a loss and vice versa; ties stay.
    assert result["label"] == "brevity"
    assert result["subsets"]["alpacaeval-easy"]["accuracy"] == pytest.approx(0.25)
    assert result["subsets"]["llmbar-natural"]["accuracy"] == pytest.approx(0.25)


@pytest.mark.parametrize("args, message", [
    (["--data", "{bad}"],
     r"error: {bad}, line 2: field 'chosen': missing; RewardBench rows need prompt, chosen, rejected, "),
    (["--data", "{empty}"],
     r"error: {empty}: no rows; expected RewardBench rows with prompt, chosen, rejected, subset"),
    (["--data", "{fixture}", "--subsets", "alpacaeval-easy,mt-bench-hrd"],
     r"error: --subsets: 'mt-bench-hrd' is not a subset of {fixture} \(did you mean mt-bench-easy\?\); it "),
    (["--data", "{fixture}", "--reference", "sft"],
     r"error: an implicit reward model needs both --reference and --beta"),
    (["--data", "{tmp}/nothing.jsonl"], r"error: {tmp}/nothing.jsonl: no such file"),
    (["--data", "{fixture}", "--subsets", ","],
     r"error: --subsets: no subset named; {fixture} has: alpacaeval-easy, "),
    (["--data", "{fixture}", "--reference", "sft", "--beta", "0"],
     r"error: --beta must be positive, got 0.0"),
])
def test_cli_bad_input_exits_2_with_one_line(length_model, tmp_path, capsys, args, message):
    bad, empty = tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "x"}) + "\n"
                   + json.dumps({"prompt": "p", "rejected": "b", "subset": "x"}) + "\n")
    empty.write_text("")
    paths = {"bad": bad, "empty": empty, "fixture": FIXTURE, "tmp": tmp_path}
    args = [a.format(**paths) for a in args]
    assert rb.main(["--model", "rm", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "Traceback" not in err
    assert re.match(message.format(**{k: re.escape(str(v)) for k, v in paths.items()}), err), err
    assert length_model.loaded == []  # data problems are found before a model is loaded


def test_cli_unwritable_json_exits_2(length_model, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "rb.json"
    assert rb.main(["--model", "rm", "--data", str(FIXTURE), "--json", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --json {out}: cannot write the results: ")


# ---------------------------------------------------------------------------------------------
# Command line with real models: a tiny Llama reward model, and a policy/reference pair
# ---------------------------------------------------------------------------------------------

LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(reward model folder, policy folder): the Llama fixture with a random reward head (pad id 2,
    not an EOS id), and the same decoder with perturbed weights as a DPO-like policy."""
    import jax

    from prefjax.models import hf_checkpoint

    root = tmp_path_factory.mktemp("rewardbench_models")
    ckpt = hf_checkpoint.load(LLAMA)
    rng = np.random.default_rng(0)
    head = rng.normal(0.0, 1.0, (ckpt.cfg.hidden_size, 1)).astype(np.float32)
    hf_checkpoint.save_reward_model(root / "rm", ckpt.cfg, ckpt.params, jax.numpy.asarray(head),
                                    labels=("reward",), pad_token_id=2, copy_from=LLAMA)
    policy = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), ckpt.params)
    hf_checkpoint.save(root / "policy", ckpt.cfg, policy, copy_from=LLAMA)
    return root / "rm", root / "policy"


@pytest.fixture
def cached_loads(monkeypatch):
    """prefjax.reward.load / load_implicit, each model loaded once per test session: the command
    line and the direct scoring below then share compiled programs (a CPU compile costs seconds)."""
    for name in ("load", "load_implicit"):
        real = getattr(reward, name)

        def cached(*args, _real=real, _name=name, **kwargs):
            key = (_name, args, tuple(sorted(kwargs.items())))
            if key not in _MODELS:
                _MODELS[key] = _real(*args, **kwargs)
            return _MODELS[key]

        monkeypatch.setattr(reward, name, cached)
    return reward


_MODELS: dict = {}
BATCH = 8  # both paths score the same 36 sequences in the same length buckets: the same shapes


def _direct_accuracies(model, subsets=tuple(BY_HAND)) -> dict[str, float]:
    """Per-subset accuracy from prefjax.reward.score on the fixture's texts, counted here."""
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    rows = [row for row in rows if row["subset"] in subsets]
    n = len(rows)
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    rewards = reward.score(model, [r["prompt"] for r in rows] * 2, responses, batch_size=BATCH)[:, 0]
    chosen, rejected = rewards[:n], rewards[n:]
    credit = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
    names = np.array([r["subset"] for r in rows])
    return {name: float(credit[names == name].mean()) for name in subsets}


def test_cli_explicit_reward_model_matches_direct_scoring(tiny_models, cached_loads, tmp_path, monkeypatch):
    rm_folder, _ = tiny_models
    # One device (the implicit test runs on the mesh): three length buckets compile faster there.
    monkeypatch.setattr(rb, "_default_mesh", lambda: None)
    out = tmp_path / "rb.json"
    assert rb.main(["--model", str(rm_folder), "--data", str(FIXTURE), "--json", str(out),
                    "--batch-size", str(BATCH)]) == 0
    result = json.loads(out.read_text())
    expected = _direct_accuracies(reward.load(str(rm_folder)))
    assert {k: v["accuracy"] for k, v in result["subsets"].items()} == pytest.approx(expected)
    assert len(set(expected.values())) > 2  # a random head gives mixed outcomes, not a constant
    assert result["label"] == "reward" and result["pairs"] == 18


# Pairs whose six sequences all fall in the 64-token bucket: one compiled program per model.
LONG_SUBSETS = ("hep-python", "hep-go", "donotanswer")


def test_cli_implicit_reward_model(tiny_models, cached_loads, tmp_path):
    _, policy = tiny_models  # scored on the 8 test devices' mesh, as the command line does
    out = tmp_path / "rb.json"
    common = ["--beta", "0.1", "--data", str(FIXTURE), "--json", str(out), "--batch-size", str(BATCH),
              "--subsets", ",".join(LONG_SUBSETS)]
    # A policy against itself: every implicit reward is 0, so every pair ties and scores 0.5.
    assert rb.main(["--model", str(LLAMA), "--reference", str(LLAMA), *common]) == 0
    same = json.loads(out.read_text())
    assert all(v["accuracy"] == 0.5 and v["ties"] == v["count"] for v in same["subsets"].values())
    assert same["overall"] == 0.5 and same["label"] == reward.IMPLICIT_LABEL
    assert rb.main(["--model", str(policy), "--reference", str(LLAMA), *common]) == 0
    result = json.loads(out.read_text())
    assert (result["model"], result["reference"], result["beta"]) == (str(policy), str(LLAMA), 0.1)
    assert set(result["subsets"]) == set(LONG_SUBSETS) and result["pairs"] == 4
    expected = _direct_accuracies(reward.load_implicit(str(policy), str(LLAMA), beta=0.1), LONG_SUBSETS)
    assert {k: v["accuracy"] for k, v in result["subsets"].items()} == pytest.approx(expected)
    assert sum(v["ties"] for v in result["subsets"].values()) == 0
