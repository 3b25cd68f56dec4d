"""Reward sources: Python functions, judges, mixtures, reward models, and resolving the config."""

from __future__ import annotations

import math
import textwrap

import ml_collections
import numpy as np
import pytest

from prefjax import reward
from prefjax.data.records import Location, parse_row
from prefjax.data.tokenize import tokenize_example
from prefjax.models import hf_checkpoint
from prefjax.online import rewards
from prefjax.quickstart import tasks
from tests.reward import tiny_models


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _config(sources, weights=(), preference_scale=1.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"sources": tuple(sources), "weights": tuple(weights),
                                      "preference_scale": preference_scale})


# --------------------------------------------------------------------------- Python functions

def _batched(prompts, responses):
    return [float(len(r)) - 0.5 * len(p) for p, r in zip(prompts, responses)]


def _annotated(prompt: str, response: str) -> float:
    return float(len(response)) - 0.5 * len(prompt)


PROMPTS, RESPONSES = ["ab", "c", "def"], ["xyz", "", "q"]
WANT = np.array([2.0, -0.5, -0.5])


@pytest.mark.parametrize("fn", [_batched, _annotated, lambda p, r: float(len(r)) - 0.5 * len(p),
                                lambda p, r: len(r.strip()) - 0.5 * len(p.strip())],
                         ids=["batched", "per-example annotated", "per-example returning a number on lists",
                              "per-example raising on lists"])
def test_python_reward_takes_batched_and_per_example_functions(fn):
    source = rewards.PythonReward(fn)
    got = source.rewards(PROMPTS, RESPONSES)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, WANT)
    np.testing.assert_array_equal(source.rewards(PROMPTS[:1], RESPONSES[:1]), WANT[:1])  # the form stays fixed


def test_a_batched_function_is_called_once_per_batch():
    calls = []

    def fn(prompts, responses):
        calls.append(len(prompts))
        return _batched(prompts, responses)

    source = rewards.PythonReward(fn, preference_scale=2.0)
    source.rewards(PROMPTS, RESPONSES)
    p = source.preference(PROMPTS, RESPONSES, ["a", "bb", ""])
    assert calls == [3, 6]  # preference scores both sides in one call
    want = [_sigmoid(2.0 * (w - (len(b) - 0.5 * len(q)))) for q, w, b in zip(PROMPTS, WANT, ["a", "bb", ""])]
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_bradley_terry_and_hard_labels():
    r_a, r_b = np.array([1.0, 0.0, -3.0, 500.0]), np.array([0.0, 0.0, -1.0, -500.0])
    np.testing.assert_allclose(rewards.bradley_terry(r_a, r_b, 0.5), [_sigmoid(0.5), 0.5, _sigmoid(-1.0), 1.0],
                               rtol=1e-12)
    np.testing.assert_array_equal(rewards.bradley_terry(r_a, r_b, math.inf), [1.0, 0.5, 0.0, 1.0])
    for bad in (0, -1.0, math.nan, "1"):
        with pytest.raises(rewards.RewardConfigError, match="must be a number > 0 .* use inf for hard labels"):
            rewards.PythonReward(_batched, preference_scale=bad)


def test_python_reward_errors_name_the_function():
    def short(prompts, responses):
        return [1.0] * (len(prompts) - 1)

    def nan(prompts, responses):
        return [0.0, float("nan"), 1.0]

    def boom(prompts, responses):
        raise ZeroDivisionError("division by zero")

    def words(prompt: str, response: str):
        return "good"

    name = __name__
    cases = [(short, (rf"reward function {name}\..*short returned shape \[2\] for 3 items; it must return one "
                      "number per item, in order")),
             (nan, (rf"reward function {name}\..*nan returned nan for item 1 \(1 non-finite value\(s\)\); it "
                    "must return finite numbers")),
             (boom, rf"reward function {name}\..*boom raised ZeroDivisionError on a batch of 3: division by zero"),
             (words, rf"reward function {name}\..*words returned 'good' for item 0; it must return a number")]
    for fn, message in cases:
        with pytest.raises(rewards.RewardError, match=message):
            rewards.PythonReward(fn).rewards(PROMPTS, RESPONSES)
    with pytest.raises(rewards.RewardError, match="3 prompts but 2 responses"):
        rewards.PythonReward(_batched).rewards(PROMPTS, RESPONSES[:2])


def test_a_per_example_function_that_raises_is_named_with_the_item():
    def fn(prompt: str, response: str) -> float:
        return 1.0 / len(response)

    with pytest.raises(rewards.RewardError, match=r"\.fn raised ZeroDivisionError on item 1: float division by zero"):
        rewards.PythonReward(fn).rewards(PROMPTS, RESPONSES)


# --------------------------------------------------------------------------- judges and mixtures

def _judge(prompts, a, b):
    return [0.9 if len(x) > len(y) else 0.1 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]


def test_a_preference_function_gives_preferences_and_refuses_scalar_rewards():
    source = rewards.PreferenceFunction(_judge)
    assert not source.gives_rewards and rewards.PythonReward(_batched).gives_rewards
    np.testing.assert_array_equal(source.preference(["p"] * 3, ["aa", "a", "b"], ["a", "aa", "c"]), [0.9, 0.1, 0.5])
    with pytest.raises(rewards.RewardError, match=r"_judge compares two responses and gives no scalar reward; .*"
                                                  r"pairs\.win_rates"):
        source.rewards(["p"], ["a"])
    with pytest.raises(rewards.RewardError, match=r"returned 1\.5 for item 0; it must return probabilities P\(a > b\) "
                                                  r"in \[0, 1\]"):
        rewards.PreferenceFunction(lambda p, a, b: [1.5] * len(a)).preference(["p"], ["a"], ["b"])


def test_a_mixture_sums_weighted_rewards_and_averages_weighted_preferences():
    first = rewards.PythonReward(_batched, preference_scale=1.0)
    second = rewards.PythonReward(lambda ps, rs: [float(r.count("x")) for r in rs], preference_scale=3.0)
    mix = rewards.Mixture([first, second], (0.25, 2.0))
    prompts, a, b = ["p", "q"], ["xx", "y"], ["x", "xyy"]
    r1, r2 = np.array([2 - 0.5, 1 - 0.5]), np.array([2.0, 0.0])
    np.testing.assert_allclose(mix.rewards(prompts, a), 0.25 * r1 + 2.0 * r2)
    p1 = first.preference(prompts, a, b)
    p2 = second.preference(prompts, a, b)
    np.testing.assert_allclose(mix.preference(prompts, a, b), (0.25 * p1 + 2.0 * p2) / 2.25)
    np.testing.assert_allclose(rewards.Mixture([first, second]).rewards(prompts, a), r1 + r2)  # () = all 1.0
    judged = rewards.Mixture([first, rewards.PreferenceFunction(_judge)], (1.0, 1.0))
    assert not judged.gives_rewards
    np.testing.assert_allclose(judged.preference(prompts, a, b), (p1 + [0.9, 0.1]) / 2)
    with pytest.raises(rewards.RewardConfigError, match=r"one weight per source: 2 sources, 1 weights"):
        rewards.Mixture([first, second], (1.0,))
    with pytest.raises(rewards.RewardConfigError, match=r"weights \[1.0, -1.0\] must be finite, >= 0 and not all 0"):
        rewards.Mixture([first, second], (1.0, -1.0))


# --------------------------------------------------------------------------- resolve

def test_resolve_task_rewards_and_a_weighted_mixture():
    task = tasks.get_task("arithmetic")
    prompts = task.prompts(np.random.default_rng(0), 6)
    answers = [str(sum(task.operands(p))) if i % 2 else "0" for i, p in enumerate(prompts)]
    source = rewards.resolve(_config(["task:arithmetic"]))
    assert isinstance(source, rewards.PythonReward)
    got = source.rewards(prompts, answers)
    np.testing.assert_array_equal(got, task.rewards(prompts, answers))
    assert 0 < got.sum() < len(got)
    mix = rewards.resolve(_config(["task:arithmetic", "task:arithmetic"], (2.0, 0.5), preference_scale=math.inf))
    assert isinstance(mix, rewards.Mixture) and mix.weights == (2.0, 0.5)
    np.testing.assert_allclose(mix.rewards(prompts, answers), 2.5 * got)
    others = answers[1:] + answers[:1]
    np.testing.assert_array_equal(mix.preference(prompts, answers, others),  # hard labels
                                  0.5 * (1 + np.sign(got - task.rewards(prompts, others))))
    sentiment = tasks.get_task("sentiment")
    prompts = sentiment.prompts(np.random.default_rng(0), 4)
    answers = [sentiment.demonstration(p, np.random.default_rng(i)) for i, p in enumerate(prompts)]
    np.testing.assert_array_equal(rewards.resolve(_config(["task:sentiment"])).rewards(prompts, answers),
                                  sentiment.rewards(prompts, answers))


def test_resolve_imports_module_and_file_functions(tmp_path, monkeypatch):
    (tmp_path / "online_reward_mod_a.py").write_text(textwrap.dedent("""
        VALUE = 3
        def length(prompts, responses):
            return [len(r) for r in responses]
        def longer(prompts, a, b):
            return [float(len(x) > len(y)) for x, y in zip(a, b)]
    """))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rewards.py").write_text("def exclaims(prompt: str, response: str) -> float:\n"
                                                  "    return float(response.endswith('!'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    source = rewards.resolve(_config(["online_reward_mod_a:length", "sub/rewards.py:exclaims"]))
    np.testing.assert_array_equal(source.rewards(["p", "p"], ["hi!", "hello"]), [4.0, 5.0])
    judge = rewards.resolve(_config(["preference:online_reward_mod_a:longer"]))
    assert isinstance(judge, rewards.PreferenceFunction)
    np.testing.assert_array_equal(judge.preference(["p", "p"], ["aa", "a"], ["a", "aa"]), [1.0, 0.0])
    file_judge = rewards.resolve(_config([f"preference:{tmp_path / 'online_reward_mod_a.py'}:longer"]))
    np.testing.assert_array_equal(file_judge.preference(["p"], ["aa"], ["a"]), [1.0])

    def error(sources, **kw):
        with pytest.raises(rewards.RewardConfigError) as info:
            rewards.resolve(_config(sources, **kw))
        return str(info.value)

    assert error(["task:arithmetic", "no_such_module_xyz:f"]) == (
        "online.reward.sources[1]='no_such_module_xyz:f': no module named 'no_such_module_xyz' (run from the folder "
        "that holds it, add that folder to PYTHONPATH, or give a file: path/to/file.py:function)")
    assert error(["online_reward_mod_a:lenght"]).startswith(
        "online.reward.sources[0]='online_reward_mod_a:lenght': online_reward_mod_a has no attribute 'lenght' "
        "(did you mean length?); its functions: ['length', 'longer']")
    assert error(["online_reward_mod_a:VALUE"]) == (
        "online.reward.sources[0]='online_reward_mod_a:VALUE': online_reward_mod_a:VALUE is a int, not a function")
    assert error(["missing/file.py:f"]) == (
        f"online.reward.sources[0]='missing/file.py:f': no file missing/file.py (looked for "
        f"{tmp_path / 'missing' / 'file.py'})")
    (tmp_path / "broken.py").write_text("import not_installed_dependency_xyz\n")
    assert error(["broken:f"]) == ("online.reward.sources[0]='broken:f': importing module broken failed: No module "
                                   "named 'not_installed_dependency_xyz'")
    assert error(["task:arithmatic"]) == ("online.reward.sources[0]='task:arithmatic': no task 'arithmatic' (did you "
                                          "mean arithmetic?); tasks are ['arithmetic', 'sentiment']")
    assert "expected one of task:NAME, rm:FOLDER_OR_HUB_ID" in error(["length"])
    assert error([]).startswith("online.reward.sources=(): give a tuple of one or more reward specs")
    assert error(["task:arithmetic"], weights=(1.0, 2.0)) == (
        "online.reward.weights=(1.0, 2.0): give one weight per source (1: ['task:arithmetic']), or () for all 1.0")
    assert error(["task:arithmetic"], preference_scale=0.0).startswith("online.reward.preference_scale=0.0: must be")


def test_a_function_raising_inside_a_resolved_source_is_named_by_its_spec(tmp_path, monkeypatch):
    (tmp_path / "online_reward_mod_b.py").write_text("def bad(prompts, responses):\n    raise KeyError('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = rewards.resolve(_config(["online_reward_mod_b:bad"]))
    with pytest.raises(rewards.RewardError, match=r"reward function online_reward_mod_b:bad raised KeyError on a "
                                                  r"batch of 1: 'x'"):
        source.rewards(["p"], ["r"])


# --------------------------------------------------------------------------- reward models

# Short enough for one length bucket (16 tokens): every call below reuses one compiled program.
TEXT_PROMPTS = ["Hello there", "What is 2+2", "A story"]
TEXT_RESPONSES = [" fine thanks", " 4", " a cat sat"]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    ck, folder = tiny_models.fixture(), tmp_path_factory.mktemp("rm") / "rm"
    hf_checkpoint.save_reward_model(folder, ck.cfg, ck.params, tiny_models.head(1), labels=("reward",),
                                    pad_token_id=3, copy_from=tiny_models.FIXTURE)
    return str(folder)


def _ids(tokenizer, render, prompt, response):
    """(prompt ids, response ids) as the trainer renders a plain-text row (EOS closes the response)."""
    example = parse_row({"prompt": prompt, "completion": response, "label": True}, "unpaired",
                        Location("test", 0, "index"))
    ids, mask = tokenize_example(example, tokenizer, render).sequence(0)
    start = int(np.flatnonzero(mask)[0])
    return [int(t) for t in ids[:start]], [int(t) for t in ids[start:]]


def test_a_reward_model_scores_the_policys_ids_or_the_text_like_reward_score(rm_folder):
    same = rewards.resolve(_config([f"rm:{rm_folder}"], preference_scale=0.5),
                           tokenizer=tiny_models.fixture().tokenizer)
    assert isinstance(same, rewards.RewardModelReward) and same.same_tokenizer
    rm = same.model  # one model object: its compiled programs are shared by every call below
    same.batch_size = len(TEXT_PROMPTS)  # preference's 2N rows then run as N-row batches: the same program
    want = reward.score(rm, TEXT_PROMPTS, TEXT_RESPONSES)[:, 0].astype(np.float64)
    assert want.std() > 1e-3  # the texts get different rewards, so swapping them would show
    split = [_ids(rm.tokenizer, rm.render, p, r) for p, r in zip(TEXT_PROMPTS, TEXT_RESPONSES)]
    prompt_ids, response_ids = [s[0] for s in split], [s[1] for s in split]
    assert max(len(p) + len(r) for p, r in split) <= 16
    got = same.rewards(TEXT_PROMPTS, TEXT_RESPONSES, prompt_ids=prompt_ids, response_ids=response_ids)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The ids are what is scored: the texts of other rows change nothing.
    np.testing.assert_allclose(same.rewards(TEXT_PROMPTS, TEXT_RESPONSES[::-1], prompt_ids=prompt_ids,
                                            response_ids=response_ids), want, rtol=1e-5, atol=1e-6)
    p = same.preference(TEXT_PROMPTS, TEXT_RESPONSES, TEXT_RESPONSES[1:] + TEXT_RESPONSES[:1], prompt_ids=prompt_ids,
                        ids_a=response_ids, ids_b=response_ids[1:] + response_ids[:1])
    cross = reward.score(rm, TEXT_PROMPTS, TEXT_RESPONSES[1:] + TEXT_RESPONSES[:1])[:, 0]
    np.testing.assert_allclose(p, [_sigmoid(0.5 * (a - b)) for a, b in zip(want, cross)], rtol=1e-4)
    # Without the policy's tokenizer the text is re-tokenised by the reward model.
    text = rewards.RewardModelReward(rm)
    assert not text.same_tokenizer
    np.testing.assert_allclose(text.rewards(TEXT_PROMPTS, TEXT_RESPONSES, prompt_ids=prompt_ids,
                                            response_ids=response_ids), want, rtol=1e-5, atol=1e-6)


def test_a_message_list_prompt_goes_through_the_reward_models_chat_template():
    rm = tiny_models.shared_explicit()
    prompt = [{"role": "user", "content": "What is two plus two"}]
    want = reward.score(rm, [prompt], [[{"role": "assistant", "content": "It is 4"}]])[:, 1]
    source = rewards.RewardModelReward(rm, label_index=1)
    np.testing.assert_allclose(source.rewards([prompt], ["It is 4"]), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(rewards.RewardConfigError, match=r"tiny-rm: label_index=2 must be one of \[0, 1\] \(labels "
                                                        r"\['helpfulness', 'safety'\]\)"):
        rewards.RewardModelReward(rm, label_index=2)


def test_a_missing_reward_model_folder_is_named_by_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"online\.reward\.sources\[0\]"):
        rewards.resolve(_config([f"rm:{tmp_path / 'nope'}"]))
