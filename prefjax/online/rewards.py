"""Where online rewards and preferences come from: Python functions, reward models, judges.

    source = resolve(config.online.reward, mesh=mesh, tokenizer=policy_tokenizer)
    r = source.rewards(prompts, responses, prompt_ids=pids, response_ids=rids)         # [N] float64
    p = source.preference(prompts, a, b, prompt_ids=pids, ids_a=ia, ids_b=ib)           # [N] P(a > b)

Every source answers both questions where it can (the `RewardSource` protocol):

- `PythonReward(fn)`: fn(prompts, responses) -> one float per response, or fn(prompt, response)
  -> float (which one is detected, see `PythonReward`). The quick-start tasks' verifiable
  rewards are such functions ("task:arithmetic", "task:sentiment").
- `RewardModelReward(model)`: a prefjax.reward.RewardModel (a *ForSequenceClassification
  folder or Hub id), frozen, scored on the trainer's mesh by prefjax.reward's scorer: on the
  policy's own token ids when the two tokenizers agree, else on the text (re-tokenised).
- `PreferenceFunction(fn)`: a pairwise judge fn(prompts, a, b) -> P(a > b); it gives no scalar
  reward (algorithms needing one use win rates, prefjax.online.pairs.win_rates).
- `Mixture(sources, weights)`: a weighted sum of rewards, a weighted mean of preferences.

Scalar sources turn rewards into preferences by Bradley-Terry:
P(a > b) = sigmoid(preference_scale * (r_a - r_b)). preference_scale = inf asks for hard
labels: 1 when r_a > r_b, 0.5 on a tie, 0 when r_a < r_b. (0 would make every preference
0.5, so it is refused rather than given a second meaning.)

Config (`resolve`): online.reward.sources (tuple of spec strings, see `resolve`),
online.reward.weights (tuple of floats, () = every weight 1.0), online.reward.preference_scale.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import ml_collections
import numpy as np
from jax.sharding import Mesh

from prefjax import reward as reward_lib
from prefjax import suggest
from prefjax.models.tokenizer import Tokenizer
from prefjax.reward import model as reward_model
from prefjax.reward import scorer
from prefjax.train.config_lib import ConfigError

Ids = Sequence[Sequence[int]]
KEY = "online.reward"
SPEC_FORMS = ("task:NAME", "rm:FOLDER_OR_HUB_ID", "preference:MODULE:FUNCTION", "MODULE:FUNCTION",
              "path/to/file.py:FUNCTION")


class RewardError(ValueError):
    """A reward or preference that cannot be computed (a function that raised or returned the
    wrong thing, a judge asked for a scalar reward); the message names the function."""


class RewardConfigError(ConfigError):
    """An online.reward.* key that cannot be turned into a reward source; the message names it."""


@runtime_checkable
class RewardSource(Protocol):
    """What the online loop asks of a reward: scalars per response, or P(a > b) per pair.

    `gives_rewards` says whether `rewards` can answer (a pairwise judge cannot).
    """

    gives_rewards: bool

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], *, prompt_ids: Ids | None = None,
                response_ids: Ids | None = None) -> np.ndarray:
        """[N] float64: the reward of each responses[i] to prompts[i]."""

    def preference(self, prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str], *,
                   prompt_ids: Ids | None = None, ids_a: Ids | None = None,
                   ids_b: Ids | None = None) -> np.ndarray:
        """[N] float64 in [0, 1]: P(responses_a[i] beats responses_b[i] for prompts[i])."""


# ---------------------------------------------------------------------------------------------
# Bradley-Terry


def bradley_terry(r_a: np.ndarray, r_b: np.ndarray, scale: float) -> np.ndarray:
    """sigmoid(scale * (r_a - r_b)) as float64; scale = inf gives hard labels 1 / 0.5 / 0."""
    diff = np.asarray(r_a, np.float64) - np.asarray(r_b, np.float64)
    if math.isinf(scale):
        return 0.5 * (1.0 + np.sign(diff))
    return 0.5 * (1.0 + np.tanh(0.5 * scale * diff))  # the logistic function, without exp overflow


def check_preference_scale(scale: Any, key: str = "preference_scale") -> float:
    """`scale` as a float > 0 (inf allowed), or RewardConfigError naming `key`."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or math.isnan(scale) or scale <= 0:
        raise RewardConfigError(f"{key}={scale!r}: must be a number > 0 (P(a > b) = sigmoid(scale * (r_a - r_b))); "
                                "use inf for hard labels (1, 0.5 on a tie, 0)")
    return float(scale)


class _ScalarSource:
    """Preferences from rewards: both sides scored in one call, then Bradley-Terry."""

    gives_rewards = True
    preference_scale: float

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], *, prompt_ids: Ids | None = None,
                response_ids: Ids | None = None) -> np.ndarray:
        raise NotImplementedError

    def preference(self, prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str], *,
                   prompt_ids: Ids | None = None, ids_a: Ids | None = None,
                   ids_b: Ids | None = None) -> np.ndarray:
        n = _same_length(prompts, responses_a, responses_b)
        both_ids = None if ids_a is None or ids_b is None else list(ids_a) + list(ids_b)
        r = self.rewards(list(prompts) * 2, list(responses_a) + list(responses_b),
                         prompt_ids=None if prompt_ids is None else list(prompt_ids) * 2, response_ids=both_ids)
        return bradley_terry(r[:n], r[n:], self.preference_scale)


# ---------------------------------------------------------------------------------------------
# Python functions


def function_name(fn: Callable) -> str:
    """"module.qualname" of a function, for messages."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{module}.{qualname}" if module else qualname


class _Caller:
    """Calls a user function on columns of N items, batched fn(*columns) -> N numbers or per item
    fn(*items) -> number, and checks what comes back.

    Which form `fn` has is fixed at the first call, unless given: a first parameter annotated
    `str` means per item, any other annotation means batched; unannotated functions are called
    batched first, and count as per-item when that returns a single number, or raises while a
    call on the first item alone returns a number.
    """

    def __init__(self, fn: Callable, name: str, what: str, per_example: bool | None):
        if not callable(fn):
            raise TypeError(f"{name}: expected a function, got {type(fn).__name__}")
        self.fn, self.name, self.what = fn, name, what
        self.per_example = _annotated_per_example(fn) if per_example is None else bool(per_example)

    def __call__(self, columns: Sequence[Sequence[Any]]) -> np.ndarray:
        n = len(columns[0])
        if n == 0:
            return np.zeros(0, np.float64)
        out = None
        if self.per_example is None:
            self.per_example, out = self._detect(columns)
        if self.per_example:
            values = [self._number(self._run(*(c[i] for c in columns), where=f" on item {i}"), i)
                      for i in range(n)]
            return np.asarray(values, np.float64)
        if out is None:
            out = self._run(*columns, where=f" on a batch of {n}")
        return self._numbers(out, n)

    def _detect(self, columns: Sequence[Sequence[Any]]) -> tuple[bool, Any]:
        """(whether fn works per item, its batched output when that call succeeded as a batch)."""
        try:
            out = self.fn(*columns)
        except Exception as batched_error:
            try:
                first = self.fn(*(c[0] for c in columns))
            except Exception:
                first = None
            if first is not None and np.ndim(first) == 0:
                return True, None
            raise self._raised(batched_error, f" on a batch of {len(columns[0])}") from batched_error
        return (True, None) if np.ndim(out) == 0 else (False, out)

    def _run(self, *args: Any, where: str) -> Any:
        try:
            return self.fn(*args)
        except Exception as e:
            raise self._raised(e, where) from e

    def _raised(self, error: Exception, where: str) -> RewardError:
        return RewardError(f"{self.what} {self.name} raised {type(error).__name__}{where}: {error}")

    def _number(self, value: Any, i: int) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"{self.what} {self.name} returned {_short(value)} for item {i}; it must return "
                              "a number") from None
        return self._finite(np.asarray([number]), offset=i)[0]

    def _numbers(self, values: Any, n: int) -> np.ndarray:
        try:
            array = np.asarray(values, np.float64)
        except (TypeError, ValueError):
            raise RewardError(f"{self.what} {self.name} returned {_short(values)}; it must return one number per "
                              f"item ({n})") from None
        if array.ndim != 1 or array.shape[0] != n:
            got = "a single number" if array.ndim == 0 else f"shape {list(array.shape)}"
            raise RewardError(f"{self.what} {self.name} returned {got} for {n} items; it must return one number "
                              "per item, in order")
        return self._finite(array)

    def _finite(self, array: np.ndarray, offset: int = 0) -> np.ndarray:
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise RewardError(f"{self.what} {self.name} returned {array[bad[0]]} for item {offset + bad[0]} "
                              f"({bad.size} non-finite value(s)); it must return finite numbers")
        return array


def _annotated_per_example(fn: Callable) -> bool | None:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    annotation = params[0].annotation
    return annotation is str or annotation == "str"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class PythonReward(_ScalarSource):
    """Rewards from a Python function: fn(prompts, responses) -> N floats, or fn(prompt, response)
    -> float (detected, see _Caller; `per_example` fixes it). Token ids are not passed to `fn`.

    Errors (RewardError) name the function: it raised, returned the wrong number of values, or
    a non-finite one.
    """

    def __init__(self, fn: Callable[..., Any], preference_scale: float = 1.0, *, name: str | None = None,
                 per_example: bool | None = None):
        self.name = name or function_name(fn)
        self.preference_scale = check_preference_scale(preference_scale)
        self._call = _Caller(fn, self.name, "reward function", per_example)

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], *, prompt_ids: Ids | None = None,
                response_ids: Ids | None = None) -> np.ndarray:
        _same_length(prompts, responses)
        return self._call([list(prompts), list(responses)])


class PreferenceFunction:
    """A pairwise judge: fn(prompts, responses_a, responses_b) -> P(a > b) per pair in [0, 1]
    (or fn(prompt, a, b) -> float, detected like PythonReward's). No scalar rewards."""

    gives_rewards = False

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None, per_example: bool | None = None):
        self.name = name or function_name(fn)
        self._call = _Caller(fn, self.name, "preference function", per_example)

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], *, prompt_ids: Ids | None = None,
                response_ids: Ids | None = None) -> np.ndarray:
        raise RewardError(f"preference function {self.name} compares two responses and gives no scalar reward; "
                          "use an algorithm that takes preferences, or estimate rewards as win rates "
                          "(prefjax.online.pairs.win_rates of pairs.preference_matrix)")

    def preference(self, prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str], *,
                   prompt_ids: Ids | None = None, ids_a: Ids | None = None,
                   ids_b: Ids | None = None) -> np.ndarray:
        _same_length(prompts, responses_a, responses_b)
        p = self._call([list(prompts), list(responses_a), list(responses_b)])
        outside = np.flatnonzero((p < 0) | (p > 1))
        if outside.size:
            raise RewardError(f"preference function {self.name} returned {p[outside[0]]} for item {outside[0]}; "
                              "it must return probabilities P(a > b) in [0, 1]")
        return p


# ---------------------------------------------------------------------------------------------
# Reward models


class RewardModelReward(_ScalarSource):
    """A frozen reward model's score (output `label_index`), on the mesh it was loaded on.

    With `policy_tokenizer` equal to the model's (same vocabulary, same eos/bos ids:
    prefjax.reward.model.check_same_tokenizer) and token ids given, it scores exactly
    prompt_ids + response_ids, reading the reward at the response's last token (the sampler
    keeps the stop token, so that is the EOS / end-of-turn the model was trained to read).
    Otherwise it re-tokenises the text with the reward model's own rendering
    (prefjax.reward.score): a message-list prompt goes through its chat template with the
    response as the assistant's message; a plain-text prompt is prompt + response + EOS, as
    the trainer renders text rows.
    """

    def __init__(self, model: scorer.AnyRewardModel, label_index: int = 0, preference_scale: float = 1.0, *,
                 policy_tokenizer: Tokenizer | None = None, mesh: Mesh | None = None,
                 batch_size: int = scorer.DEFAULT_BATCH_SIZE):
        if isinstance(label_index, bool) or not isinstance(label_index, int) or not 0 <= label_index < model.num_labels:
            raise RewardConfigError(f"{model.name}: label_index={label_index!r} must be one of "
                                    f"{list(range(model.num_labels))} (labels {list(model.labels)})")
        self.model, self.label_index, self.mesh, self.batch_size = model, label_index, mesh, batch_size
        self.preference_scale = check_preference_scale(preference_scale)
        self.same_tokenizer = policy_tokenizer is not None and _same_tokenizer(policy_tokenizer, model.tokenizer)

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], *, prompt_ids: Ids | None = None,
                response_ids: Ids | None = None) -> np.ndarray:
        n = _same_length(prompts, responses)
        if self.same_tokenizer and prompt_ids is not None and response_ids is not None:
            if len(prompt_ids) != n or len(response_ids) != n:
                raise RewardError(f"{self.model.name}: {n} responses but {len(prompt_ids)} prompt_ids and "
                                  f"{len(response_ids)} response_ids; give one of each per response")
            sequences = [self._sequence(p, r, i) for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]
            scores = scorer.score_sequences(self.model, sequences, batch_size=self.batch_size, mesh=self.mesh)
        else:
            texts = [[{"role": "assistant", "content": r}] if not isinstance(p, str) else r
                     for p, r in zip(prompts, responses)]
            scores = reward_lib.score(self.model, list(prompts), texts, batch_size=self.batch_size, mesh=self.mesh)
        return scores[:, self.label_index].astype(np.float64)

    def _sequence(self, prompt_ids: Sequence[int], response_ids: Sequence[int], i: int) -> scorer.ScoredSequence:
        ids = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
        mask = np.r_[np.zeros(len(prompt_ids)), np.ones(len(response_ids))].astype(np.float32)
        if len(ids) == 0:
            raise RewardError(f"{self.model.name}: sample {i} has no tokens (empty prompt_ids and response_ids)")
        mask[-1] = 1.0  # an empty response is read at the prompt's last token (the explicit reward's position)
        return scorer.ScoredSequence(ids, mask, f"sample {i} (prompt + response)")


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    try:
        reward_model.check_same_tokenizer(a, b, "policy", "reward model")
    except reward_model.TokenizerMismatchError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Mixtures


class Mixture:
    """sum_i w_i * rewards_i, and sum_i w_i * preference_i / sum_i w_i (weights >= 0, sum > 0)."""

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float] = ()):
        weights = tuple(float(w) for w in weights) or (1.0,) * len(sources)
        if not sources or len(weights) != len(sources):
            raise RewardConfigError(f"a reward mixture needs one weight per source: {len(sources)} sources, "
                                    f"{len(weights)} weights")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise RewardConfigError(f"reward weights {list(weights)} must be finite, >= 0 and not all 0 (a penalty "
                                    "is a reward function that returns negative values)")
        self.sources, self.weights = tuple(sources), weights
        self.gives_rewards = all(s.gives_rewards for s in self.sources)

    def rewards(self, prompts: Sequence[Any], responses: Sequence[str], *, prompt_ids: Ids | None = None,
                response_ids: Ids | None = None) -> np.ndarray:
        total = np.zeros(_same_length(prompts, responses), np.float64)
        for source, w in zip(self.sources, self.weights):
            total += w * source.rewards(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids)
        return total

    def preference(self, prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str], *,
                   prompt_ids: Ids | None = None, ids_a: Ids | None = None,
                   ids_b: Ids | None = None) -> np.ndarray:
        total = np.zeros(_same_length(prompts, responses_a, responses_b), np.float64)
        for source, w in zip(self.sources, self.weights):
            total += w * source.preference(prompts, responses_a, responses_b, prompt_ids=prompt_ids, ids_a=ids_a,
                                           ids_b=ids_b)
        return total / sum(self.weights)


def _same_length(prompts: Sequence[Any], *responses: Sequence[Any]) -> int:
    if isinstance(prompts, str) or any(isinstance(r, str) for r in responses):
        raise RewardError("prompts and responses must be lists of texts, not one string")
    lengths = [len(prompts)] + [len(r) for r in responses]
    if len(set(lengths)) != 1:
        raise RewardError(f"{lengths[0]} prompts but {' / '.join(map(str, lengths[1:]))} responses; give one prompt "
                          "per response (repeat a prompt to score several responses to it)")
    return lengths[0]


# ---------------------------------------------------------------------------------------------
# From the config


def resolve(reward_config: ml_collections.ConfigDict, *, mesh: Mesh | None = None, rules: Any = None,
            tokenizer: Tokenizer | None = None) -> RewardSource:
    """The reward source online.reward describes.

    sources: spec strings, one source each:
      "task:arithmetic" / "task:sentiment"  the quick-start task's verifiable reward
      "module.path:function"                a Python reward function (imported)
      "path/to/file.py:function"            the same from a file (relative to the working directory)
      "rm:FOLDER_OR_HUB_ID"                 a reward model (prefjax.reward.load on `mesh`), output 0
      "preference:MODULE_OR_FILE:function"  a pairwise judge fn(prompts, a, b) -> P(a > b)
    weights: one per source, () = all 1.0; several sources make a Mixture.
    preference_scale: Bradley-Terry scale for scalar sources (inf = hard labels).
    `tokenizer`: the policy's, so a reward model with the same tokenizer reads the policy's
    token ids. `rules` is accepted for the caller's convenience: a reward model's parameters are
    placed by prefjax.reward with its default logical-axis rules on `mesh`.
    """
    del rules  # see the docstring
    sources = reward_config.get("sources", ())
    if isinstance(sources, str) or not isinstance(sources, (tuple, list)) or not sources:
        raise RewardConfigError(f"{KEY}.sources={sources!r}: give a tuple of one or more reward specs, e.g. "
                                f"('task:arithmetic',); each one of {', '.join(SPEC_FORMS)}")
    scale = check_preference_scale(reward_config.get("preference_scale", 1.0), f"{KEY}.preference_scale")
    weights = reward_config.get("weights", ())
    if not isinstance(weights, (tuple, list)) or (weights and len(weights) != len(sources)):
        raise RewardConfigError(f"{KEY}.weights={weights!r}: give one weight per source ({len(sources)}: "
                                f"{list(sources)}), or () for all 1.0")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
           or w < 0]
    if bad or (weights and sum(weights) <= 0):
        raise RewardConfigError(f"{KEY}.weights={weights!r}: weights must be finite numbers >= 0, not all 0")
    built = [_source(spec, f"{KEY}.sources[{i}]", scale, mesh, tokenizer) for i, spec in enumerate(sources)]
    if len(built) == 1 and tuple(weights) in ((), (1.0,), (1,)):
        return built[0]
    return Mixture(built, weights)


def _source(spec: Any, key: str, scale: float, mesh: Mesh | None, tokenizer: Tokenizer | None) -> RewardSource:
    if not isinstance(spec, str) or not spec.strip():
        raise RewardConfigError(f"{key}={spec!r}: expected a string, one of {', '.join(SPEC_FORMS)}")
    where = f"{key}={spec!r}"
    kind, _, rest = spec.partition(":")
    if kind == "task":
        from prefjax.quickstart import tasks  # the quick start's module; imported only when named

        if rest not in tasks.TASKS:
            raise RewardConfigError(f"{where}: no task {rest!r}{suggest.did_you_mean(rest, tasks.TASKS)}; tasks are "
                                    f"{sorted(tasks.TASKS)}")
        return PythonReward(tasks.get_task(rest).rewards, scale, name=spec, per_example=False)
    if kind == "rm":
        if not rest:
            raise RewardConfigError(f"{where}: give the reward model's folder or Hub id after 'rm:'")
        model = reward_lib.load(rest, mesh=mesh, key=key)
        return RewardModelReward(model, 0, scale, policy_tokenizer=tokenizer, mesh=mesh)
    if kind == "preference":
        return PreferenceFunction(import_function(rest, where), name=spec)
    return PythonReward(import_function(spec, where), scale, name=spec)


def import_function(target: str, where: str) -> Callable[..., Any]:
    """The function "module.path:name" or "path/to/file.py:name" names; RewardConfigError (naming
    `where`) when the module or file is missing, fails to import, lacks `name`, or it is not callable."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardConfigError(f"{where}: expected one of {', '.join(SPEC_FORMS)}")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise RewardConfigError(f"{where}: no file {module_name} (looked for {path.resolve()})")
        module = _import_file(path, where)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name != e.name and not module_name.startswith(e.name + "."):
                raise RewardConfigError(f"{where}: importing module {module_name} failed: {e}") from e
            raise RewardConfigError(f"{where}: no module named {module_name!r} (run from the folder that holds it, "
                                    "add that folder to PYTHONPATH, or give a file: path/to/file.py:function)") from e
        except Exception as e:
            raise RewardConfigError(f"{where}: importing module {module_name} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise RewardConfigError(f"{where}: {module_name} has no attribute {attr!r}"
                                f"{suggest.did_you_mean(attr, names)}; its functions: {names[:20]}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardConfigError(f"{where}: {module_name}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def _import_file(path: Path, where: str) -> Any:
    # A unique module name per file, so two files both called rewards.py do not collide.
    name = f"prefjax_online_reward_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardConfigError(f"{where}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardConfigError(f"{where}: importing {path} raised {type(e).__name__}: {e}") from e
    return module
