"""The online batch source: rounds of sample -> score -> label, read by the unchanged train loop.

    source = OnlineSource(config, workdir)          # job="online" builds it (prefjax.online.job)
    prefjax.train.run(config, workdir, source=source)

The loop binds the source to the run once (`bind(setup)`: model, roles, fixed weights,
tokenizer, mesh) and shows it the train state before every batch (`observe(state)`), so
every sample comes from the parameters the previous step produced (prefjax.online.rollout).

Rounds. A round takes N prompts (online.prompts_per_round, or data.batch_size when it is 0),
samples K responses for each from the policy as it is at the round's start, scores them,
labels them (prefjax.online.algorithms), writes them to the sample store, and then serves
its N examples for online.epochs_per_round epochs (shuffled per epoch when a round spans
several steps), data.batch_size per step. One step per round is online learning (fresh
samples every step); longer rounds are iterative learning. A prompt whose samples tie gives
an example of weight 0 (no preference): shapes and the number of steps per round stay fixed,
and the fraction of such prompts is logged.

Resume. The source's position (steps served; the prompt stream's position at the round's
start and end) goes into each checkpoint. A run resumed at a round's first step samples the
round again from the restored policy, with the round's own key (the same samples as before);
a run resumed in the middle of a round reads the round back from the sample store, so the
trajectory is the same either way.

Metrics (of the round each step trains on; measured when the round is sampled): online/reward (mean over all samples),
online/kl (mean log pi(y) - log pi_ref(y) over the policy's samples at temperature 1, an
unbiased estimate of KL(pi || pi_ref) when the reference is the initial policy),
online/response_tokens, online/complete (fraction of samples that ended with a stop token),
online/ties (prompts whose samples tie), online/pairs (examples with a preference),
online/win_rate (Nash-MD: mean P(y > y')), online/sample_seconds, online/label_seconds.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np

from prefjax import batch as batch_lib
from prefjax.batch import Batch
from prefjax.data import prefix_sharing, streams
from prefjax.online import algorithms, pairs, rollout
from prefjax.online import prompts as prompts_lib
from prefjax.online import rewards as rewards_lib
from prefjax.online import store as store_lib
from prefjax.train import config_lib, loss_inputs

STORE_DIR = "samples"


class OnlineError(config_lib.ConfigError):
    """An online run that cannot go on as configured (the message says what to change)."""


def reference_mode(config: ml_collections.ConfigDict) -> str:
    """online.reference with "auto" resolved for the algorithm."""
    mode = config.online.reference
    return algorithms.get(config.online.algorithm).reference if mode == "auto" else mode


def samples_per_prompt(config: ml_collections.ConfigDict) -> int:
    """Samples drawn per prompt (the algorithm's own count, or online.samples_per_prompt)."""
    algorithm = algorithms.get(config.online.algorithm)
    return algorithm.samples or config.online.samples_per_prompt


def round_prompts(config: ml_collections.ConfigDict) -> int:
    return config.online.prompts_per_round or config.data.batch_size


def prompt_width(config: ml_collections.ConfigDict) -> int:
    """Prompt tokens a row holds: data.max_prompt_len, else what data.max_len leaves after
    online.max_new_tokens (longer prompts are skipped and counted); HyPO's prompts are its
    offline rows', up to data.max_len."""
    if algorithms.get(config.online.algorithm).offline:
        return config.data.max_len
    return config.data.max_prompt_len or config.data.max_len - config.online.max_new_tokens


def steps_per_round(config: ml_collections.ConfigDict) -> int:
    return round_prompts(config) * config.online.epochs_per_round // config.data.batch_size


class OnlineSource:
    """A prefjax.train.batch_source.LivePolicySource (module docstring)."""

    provides_reference_logps = True
    data_iterator = None

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.config = config
        self.algorithm = algorithms.get(config.online.algorithm)
        self.k = samples_per_prompt(config)
        self.num_responses = {"nash_md": 1, "hypo": 3}.get(self.algorithm.name, 2)
        self.offline: Any = None  # HyPO's stream of offline pairs
        self.reference = reference_mode(config)
        self.round_size = round_prompts(config)
        self.steps_per_round = steps_per_round(config)
        self.workdir = Path(workdir)
        self.pad_id = 0
        self.served = 0  # batches handed to the loop
        self._examples: Optional[dict[str, Any]] = None  # the current round's examples (host arrays)
        self._round = -1
        self._order: Optional[np.ndarray] = None
        self._round_start: Any = None  # prompt stream position at the current round's start
        self._round_end: Any = None
        self._restored: Optional[dict[str, Any]] = None
        self._metrics: dict[str, float] = {}
        self._state: Any = None
        self._bound = False

    # -- the loop's protocol -------------------------------------------------------------------

    def columns(self) -> loss_inputs.Columns:
        """The columns every online batch has: scores (rewards, win rates or P(y > y')), and for
        INPO and XPO the sampler's log-probs and each response's origin."""
        template = self._template()
        return loss_inputs.Columns.present_in(template)

    def bind(self, setup: Any, mesh: jax.sharding.Mesh, rules: Any) -> None:
        config = self.config
        if setup.tokenizer is None:
            raise OnlineError("job='online' decodes samples for the reward: set model.hf_folder (with its "
                              "tokenizer) or data.tokenizer")
        self.setup, self.tokenizer = setup, setup.tokenizer
        eos = setup.tokenizer.eos_token_id
        if eos is None:
            raise OnlineError("the tokenizer has no EOS token, so sampled responses could never end; use a "
                              "tokenizer that defines eos_token")
        self.pad_id = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else eos
        self.mesh, self.rules = mesh, rules
        width = prompt_width(config)
        if self.algorithm.offline:
            self.offline = streams.make_stream(config, config.data.source, kind="pair",
                                               vocab_size=setup.model.cfg.vocab_size, tokenizer=setup.tokenizer,
                                               train=True)
            self.data_iterator = self.offline.data_iterator  # saved and restored by the checkpointer
            self.prompts = None
        else:
            self.prompts = prompts_lib.open_prompts(config.online.prompts or config.data.source,
                                                    tokenizer=setup.tokenizer, config=config, seed=config.seed,
                                                    max_prompt_len=width)
        o = config.online
        settings = rollout.Settings(
            max_new_tokens=o.max_new_tokens, prompt_width=width, stop_tokens=(int(eos),), pad_id=int(self.pad_id),
            temperature=float(o.temperature), top_k=o.top_k or None, top_p=None if o.top_p >= 1.0 else o.top_p,
            mixture_coef=float(o.mixture_coef))
        needs_reference = self.reference == "initial" or self.algorithm.draws != "policy"
        self.rollout = rollout.Rollout(setup, settings, mesh=self.mesh, rules=self.rules,
                                       needs_reference=needs_reference)
        self.reward = None  # HyPO needs no reward: it is only logged when sources are given
        if config.online.reward.sources:
            self.reward = rewards_lib.resolve(config.online.reward, mesh=self.mesh, rules=self.rules,
                                              tokenizer=setup.tokenizer)
        self.store = store_lib.SampleStore(self.workdir / STORE_DIR, fmt=config.online.store.format,
                                           keep_rounds=config.online.store.keep_rounds,
                                           writer=jax.process_index() == 0)
        self._bound = True
        if self._restored is not None:
            self._resume(self._restored)

    def observe(self, state: Any) -> None:
        self._state = state

    def pop_metrics(self) -> dict[str, float]:
        """The metrics of the round the last batch came from (every step of a round reports them, so
        that a round starting on a step that is not logged is still seen)."""
        return dict(self._metrics)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._bound:
            raise RuntimeError("OnlineSource: bind(setup) must come before the first batch")
        round_index, within = divmod(self.served, self.steps_per_round)
        if round_index != self._round:
            self._start_round(round_index)
        b = self.config.data.batch_size
        epoch_step = within % (self.round_size // b)
        picked = self._order[within * b:(within + 1) * b] if self._order is not None else \
            np.arange(epoch_step * b, (epoch_step + 1) * b)
        self.served += 1
        return self._local_batch(picked)

    def state(self) -> dict[str, Any]:
        state = dict(served=self.served, round=self._round, round_start=self._round_start,
                     round_end=self._round_end)
        if self.offline is not None:
            state["offline"] = self.offline.state()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._restored = dict(state)
        if self._bound:
            self._resume(self._restored)

    def close(self) -> None:
        if self.offline is not None:
            self.offline.close()

    # -- rounds --------------------------------------------------------------------------------

    def _resume(self, state: dict[str, Any]) -> None:
        """Continue after `state()` of a checkpoint (module docstring, "Resume")."""
        self._restored = None
        self.served = int(state.get("served", 0))
        saved_round = int(state.get("round", -1))
        if saved_round < 0:
            return
        round_index, within = divmod(self.served, self.steps_per_round)
        if self.offline is not None:  # its grain position came back with the checkpoint
            self.offline.restore(state.get("offline", {}))
        else:
            self.prompts.restore(state["round_end"])
        if within == 0:  # at a boundary: the next round is sampled from the restored policy
            self._round = round_index - 1
            self.store.drop_after(round_index - 1)
            return
        rows = self.store.read_round(round_index)
        if rows is None:
            raise OnlineError(
                f"{self.store.directory}: round {round_index} is not in the sample store, so the run cannot resume "
                f"in the middle of it (step {self.served}); restore the round's file, or raise "
                "online.store.keep_rounds for future runs")
        self._round_start, self._round_end = state["round_start"], state["round_end"]
        self._use_round(round_index, rows)
        self.store.drop_after(round_index)

    def _start_round(self, round_index: int) -> None:
        if self._state is not None:
            # the previous step is still running (dispatch is asynchronous): wait for it here, so that
            # online/sample_seconds times the sampling alone
            jax.block_until_ready(self._state.params)
        if self.offline is not None:
            rows = self._offline_round(round_index)
            self.store.write_round(round_index, rows)
            self._use_round(round_index, rows)
            return
        self._round_start = self.prompts.position
        prompts = self.prompts.take(self.round_size)
        self._round_end = self.prompts.position
        rows = self._sample_round(round_index, prompts)
        self.store.write_round(round_index, rows)
        self._use_round(round_index, rows)

    def _use_round(self, round_index: int, rows: list[dict[str, Any]]) -> None:
        self._round = round_index
        self._examples = _examples_from_rows(rows)
        epochs = self.config.online.epochs_per_round
        if self.steps_per_round == 1:
            self._order = None
        else:
            order = [np.random.default_rng((self.config.seed, round_index, epoch)).permutation(self.round_size)
                     for epoch in range(epochs)]
            self._order = np.concatenate(order)

    def _key(self, round_index: int, part: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), round_index), part)

    def _draw(self, prompt_ids: list[list[int]], round_index: int, part: int, who: str) -> rollout.Drawn:
        """Samples for `prompt_ids` (one per row), in sampler calls of online.sample_batch prompts."""
        trainable = None if who == "reference" else self._state.params
        per_prompt = self.k if self.algorithm.draws == "policy" else 1  # rows each prompt takes in this call
        chunk = (self.config.online.sample_batch or self.config.data.batch_size) * per_prompt
        drawn = []
        for n, start in enumerate(range(0, len(prompt_ids), chunk)):
            rows = prompt_ids[start:start + chunk]
            fill = chunk - len(rows)  # the last call keeps the same shape: no second compilation
            out = self.rollout.sample(trainable, rows + [rows[-1]] * fill,
                                      jax.random.fold_in(self._key(round_index, part), n), who=who)
            drawn.append(_first_rows(out, len(rows)))
        return _concat(drawn)

    def _sample_round(self, round_index: int, prompts: list[Any]) -> list[dict[str, Any]]:
        """Sample, score and label one round; the store's rows (one per prompt)."""
        a, k, n = self.algorithm, self.k, len(prompts)
        begin = time.perf_counter()
        prompt_ids = [list(p.ids) for p in prompts]
        origin = np.zeros((n, k), np.float32)
        if a.draws == "policy":
            drawn = self._draw([ids for ids in prompt_ids for _ in range(k)], round_index, 0, "policy")
        else:
            opponent = "reference" if a.draws == "policy+reference" else "mixture"
            mine = self._draw(prompt_ids, round_index, 0, "policy")
            theirs = self._draw(prompt_ids, round_index, 1, opponent)
            drawn = _interleave(mine, theirs)
            origin[:, 1] = batch_lib.ORIGIN_REFERENCE if opponent == "reference" else batch_lib.ORIGIN_MIXTURE
        sampled = time.perf_counter()
        repeated_ids = [ids for ids in prompt_ids for _ in range(k)]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in drawn.response_ids]
        prompt_texts = [p.text for p in prompts]
        policy_logps = drawn.policy_logps.reshape(n, k)
        if self.reference == "initial":
            ref_logps = self.rollout.reference_logps(repeated_ids, drawn.response_ids).reshape(n, k)
        else:
            ref_logps = policy_logps.copy()  # pi_t: the sampler's own log-probs
        labels = self._label(prompt_texts, prompt_ids, texts, drawn.response_ids, round_index)
        labelled = time.perf_counter()
        responses = [drawn.response_ids[i * k:(i + 1) * k] for i in range(n)]
        text_rows = [texts[i * k:(i + 1) * k] for i in range(n)]
        logps, sample_logps = drawn.logps.reshape(n, k), drawn.sample_logps.reshape(n, k)
        rows = []
        for i in range(n):
            rows.append(dict(
                prompt=prompt_texts[i], responses=text_rows[i], scores=[float(x) for x in labels.rewards[i]],
                prompt_ids=prompt_ids[i], response_ids=responses[i], logps=_floats(policy_logps[i]),
                ref_logps=_floats(ref_logps[i]), sampling_logps=_floats(sample_logps[i]),
                mixture_logps=_floats(logps[i]) if a.draws == "policy+mixture" else None,
                complete=[bool(x) for x in drawn.complete[i * k:(i + 1) * k]],
                origin=[int(x) for x in origin[i]], step=self.served, round=round_index,
                train_indices=[int(x) for x in labels.indices[i]],
                train_scores=[float(x) for x in labels.scores[i]], weight=float(labels.valid[i])))
        self._metrics = self._round_metrics(rows, labels, sampled - begin, labelled - sampled)
        return rows

    def _offline_round(self, round_index: int) -> list[dict[str, Any]]:
        """HyPO: the next offline batch of pairs (every process's, gathered), each with one fresh
        policy sample for its prompt, scored by the reference (and by the reward, when given)."""
        begin = time.perf_counter()
        prompt_ids, chosen, rejected, weight = _gathered_pairs(next(self.offline))
        drawn = self._draw(prompt_ids, round_index, 0, "policy")
        sampled = time.perf_counter()
        n = len(prompt_ids)
        responses = [[c, r, s] for c, r, s in zip(chosen, rejected, drawn.response_ids)]
        ref = self.rollout.reference_logps([p for p in prompt_ids for _ in range(3)],
                                           [x for triple in responses for x in triple]).reshape(n, 3)
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        prompt_texts = [decode(p) for p in prompt_ids]
        sample_texts = [decode(s) for s in drawn.response_ids]
        rewards = np.full(n, np.nan)
        if self.reward is not None and getattr(self.reward, "gives_rewards", True):
            rewards = np.asarray(self.reward.rewards(prompt_texts, sample_texts, prompt_ids=prompt_ids,
                                                     response_ids=drawn.response_ids), np.float64)
        nan = float("nan")
        rows = []
        for i in range(n):
            rows.append(dict(
                prompt=prompt_texts[i], responses=[decode(x) for x in responses[i][:2]] + [sample_texts[i]],
                scores=[nan, nan, float(rewards[i])], prompt_ids=prompt_ids[i], response_ids=responses[i],
                logps=[nan, nan, float(drawn.policy_logps[i])], ref_logps=_floats(ref[i]),
                sampling_logps=[nan, nan, float(drawn.sample_logps[i])], mixture_logps=None,
                complete=[True, True, bool(drawn.complete[i])],
                origin=[int(batch_lib.ORIGIN_DATA)] * 2 + [int(batch_lib.ORIGIN_POLICY)], step=self.served,
                round=round_index, train_indices=[0, 1, 2], train_scores=[nan, nan, nan], weight=float(weight[i])))
        valid = np.asarray(weight) > 0
        labels = _Labels(np.full((n, 3), np.nan), np.zeros((n, 3), np.int64), np.full((n, 3), np.nan), valid)
        self._metrics = self._round_metrics(rows, labels, sampled - begin, time.perf_counter() - sampled)
        return rows

    def _label(self, prompt_texts: list[str], prompt_ids: list[list[int]], texts: list[str],
               response_ids: list[list[int]], round_index: int) -> "_Labels":
        a, k = self.algorithm, self.k
        n = len(prompt_texts)
        rep_prompts = [t for t in prompt_texts for _ in range(k)]
        rep_ids = [ids for ids in prompt_ids for _ in range(k)]
        resp = [texts[i * k:(i + 1) * k] for i in range(n)]
        resp_ids = [response_ids[i * k:(i + 1) * k] for i in range(n)]
        if a.labels == "pairs":
            rewards = self._rewards(rep_prompts, texts, rep_ids, response_ids, n, k)
            if rewards is None:  # a pairwise judge only: its win rates rank the samples
                rewards = pairs.win_rates(pairs.preference_matrix(self.reward, prompt_texts, resp,
                                                                  prompt_ids=prompt_ids, response_ids=resp_ids))
            if self.config.online.pairs == "random":
                chosen, rejected, valid = pairs.random_pair(
                    rewards, np.random.default_rng((self.config.seed, round_index, 7)))
            else:
                chosen, rejected, valid = pairs.best_worst(rewards)
            indices = np.stack([chosen, rejected], 1)
            return _Labels(rewards, indices, np.take_along_axis(rewards, indices, 1), valid)
        if a.labels == "win_rates":
            matrix = pairs.preference_matrix(self.reward, prompt_texts, resp, prompt_ids=prompt_ids,
                                             response_ids=resp_ids)
            rates = pairs.win_rates(matrix)
            chosen, rejected, valid = pairs.best_worst(rates)
            indices = np.stack([chosen, rejected], 1)
            rewards = self._rewards(rep_prompts, texts, rep_ids, response_ids, n, k)
            return _Labels(rates if rewards is None else rewards, indices, np.take_along_axis(rates, indices, 1),
                           valid)
        # "preference": P(sample 0 > sample 1)
        p = np.asarray(self.reward.preference(prompt_texts, [r[0] for r in resp], [r[1] for r in resp],
                                              prompt_ids=prompt_ids, ids_a=[r[0] for r in resp_ids],
                                              ids_b=[r[1] for r in resp_ids]), np.float64)
        rewards = self._rewards(rep_prompts, texts, rep_ids, response_ids, n, k)
        if rewards is None:
            rewards = np.stack([p, 1.0 - p], 1)
        if a.name == "nash_md":  # the policy's sample (0) against the mixture's (1)
            return _Labels(rewards, np.zeros((n, 1), np.int64), p[:, None], np.ones(n, bool))
        first = p > 0.5
        indices = np.stack([np.where(first, 0, 1), np.where(first, 1, 0)], 1)
        scores = np.stack([np.maximum(p, 1 - p), np.minimum(p, 1 - p)], 1)
        return _Labels(rewards, indices, scores, p != 0.5)

    def _rewards(self, prompts: list[str], texts: list[str], prompt_ids: list[list[int]],
                 response_ids: list[list[int]], n: int, k: int) -> Optional[np.ndarray]:
        """[n, k] scalar rewards, or None when the source is a pairwise judge only."""
        if not getattr(self.reward, "gives_rewards", True):
            return None
        values = self.reward.rewards(prompts, texts, prompt_ids=prompt_ids, response_ids=response_ids)
        return np.asarray(values, np.float64).reshape(n, k)

    def _round_metrics(self, rows: list[dict[str, Any]], labels: "_Labels", sample_seconds: float,
                       label_seconds: float) -> dict[str, float]:
        """The round's metrics (module docstring), over the policy's own samples."""
        def policy(field: str) -> np.ndarray:
            return np.asarray([v for r in rows for v, o in zip(r[field], r["origin"])
                               if o == batch_lib.ORIGIN_POLICY], np.float64)

        rewards = policy("scores")
        lengths = np.asarray([len(ids) for r in rows for ids, o in zip(r["response_ids"], r["origin"])
                              if o == batch_lib.ORIGIN_POLICY], np.float64)
        out = {
            "online/reward": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan"),
            "online/response_tokens": float(lengths.mean()),
            "online/complete": float(policy("complete").mean()),
            "online/ties": float(1.0 - labels.valid.mean()),
            "online/pairs": float(labels.valid.sum()),
            "online/sample_seconds": sample_seconds,
            "online/label_seconds": label_seconds,
            "online/round": float(rows[0]["round"]) if rows else 0.0,
        }
        if self.reference == "initial":
            out["online/kl"] = float(np.mean(policy("logps") - policy("ref_logps")))
        if self.algorithm.name == "nash_md":
            out["online/win_rate"] = float(labels.scores[:, 0].mean())
        return out

    # -- batches -------------------------------------------------------------------------------

    def _template(self) -> Batch:
        """A one-example batch with this source's columns (what `columns` inspects)."""
        k = self.num_responses
        batch = Batch.from_responses([[1]], [[[1]] * k], 4, 0)
        return batch.replace(scores=np.zeros((1, k), np.float32), ref_logps=np.zeros((1, k), np.float32),
                             **self._extra_columns(np.zeros((1, k), np.float32), np.zeros((1, k), np.float32)))

    def _extra_columns(self, sampler: np.ndarray, origin: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        if self.algorithm.needs_previous_iterate:
            out["sampler_logps"] = sampler
        if self.algorithm.draws == "policy+reference":
            out["origin"] = origin
        return out

    def _local_batch(self, picked: np.ndarray) -> Batch:
        """This process's slice of the examples `picked` (global indices into the round)."""
        count, index = jax.process_count(), jax.process_index()
        per = len(picked) // count
        mine = picked[index * per:(index + 1) * per]
        e = self._examples
        batch = Batch.from_responses([e["prompt_ids"][i] for i in mine], [e["responses"][i] for i in mine],
                                     self.rollout.settings.row_length, self.pad_id)
        batch = batch.replace(weight=e["weight"][mine], scores=e["scores"][mine], ref_logps=e["ref_logps"][mine],
                              **self._extra_columns(e["sampler_logps"][mine], e["origin"][mine]))
        if self.config.data.share_prefix and self.num_responses > 1:
            # the prompt once, then each sample: fewer tokens through the step, and one row length
            # (the longest possible row) so that it compiles once
            settings = self.rollout.settings
            longest = settings.prompt_width + self.num_responses * settings.max_new_tokens
            batch = prefix_sharing.share_prefixes(batch, multiple=longest, pad_id=self.pad_id)
        return batch


class _Labels:
    """What labelling a round gives: rewards [n, K] for the store, the indices of the samples each
    example trains on [n, K'], their scores [n, K'] (rewards, win rates or P), valid [n]."""

    def __init__(self, rewards: np.ndarray, indices: np.ndarray, scores: np.ndarray, valid: np.ndarray):
        self.rewards = np.asarray(rewards, np.float64)
        self.indices = np.asarray(indices, np.int64)
        self.scores = np.asarray(scores, np.float64)
        self.valid = np.asarray(valid, bool)


def _examples_from_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The training examples of a round from its store rows (a fresh round and a resumed one
    go through here alike)."""
    out: dict[str, Any] = dict(prompt_ids=[], responses=[])
    columns: dict[str, list] = dict(scores=[], ref_logps=[], sampler_logps=[], origin=[], weight=[])
    for row in rows:
        picked = row["train_indices"]
        out["prompt_ids"].append(list(row["prompt_ids"]))
        out["responses"].append([list(row["response_ids"][i]) for i in picked])
        columns["scores"].append(row["train_scores"])
        columns["ref_logps"].append([row["ref_logps"][i] for i in picked])
        columns["sampler_logps"].append([row["logps"][i] for i in picked])
        columns["origin"].append([row["origin"][i] for i in picked])
        columns["weight"].append(row["weight"])
    for name, values in columns.items():
        out[name] = np.asarray(values, np.float32)
    return out


def _floats(values: np.ndarray) -> list[float]:
    return [float(x) for x in values]


def _first_rows(drawn: rollout.Drawn, count: int) -> rollout.Drawn:
    return rollout.Drawn(drawn.response_ids[:count], drawn.logps[:count], drawn.sample_logps[:count],
                         drawn.policy_logps[:count], drawn.complete[:count])


def _concat(parts: list[rollout.Drawn]) -> rollout.Drawn:
    return rollout.Drawn([r for p in parts for r in p.response_ids], np.concatenate([p.logps for p in parts]),
                         np.concatenate([p.sample_logps for p in parts]),
                         np.concatenate([p.policy_logps for p in parts]),
                         np.concatenate([p.complete for p in parts]))


def _interleave(first: rollout.Drawn, second: rollout.Drawn) -> rollout.Drawn:
    """Rows (prompt i, sample 0) = first[i], (prompt i, sample 1) = second[i]."""
    ids = [r for pair in zip(first.response_ids, second.response_ids) for r in pair]

    def weave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([a, b], 1).reshape(-1)

    return rollout.Drawn(ids, weave(first.logps, second.logps), weave(first.sample_logps, second.sample_logps),
                         weave(first.policy_logps, second.policy_logps), weave(first.complete, second.complete))



def _gathered_pairs(local: Batch) -> tuple[list[list[int]], list[list[int]], list[list[int]], np.ndarray]:
    """(prompt ids, chosen ids, rejected ids, weight) of every process's examples of an unpacked pair
    batch, in global example order (each process's block in turn)."""
    k, b = local.num_responses, local.num_examples
    rows = {name: np.asarray(getattr(local, name)).reshape(k, b, -1).transpose(1, 0, 2)
            for name in ("tokens", "loss_mask", "segments")}
    weight = np.asarray(local.weight, np.float32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        rows = {name: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for name, v in rows.items()}
        weight = np.asarray(multihost_utils.process_allgather(weight, tiled=True))
    prompts, chosen, rejected = [], [], []
    for tokens, scored, live in zip(rows["tokens"], rows["loss_mask"] > 0, rows["segments"] > 0):
        first = int(np.argmax(scored[0])) if scored[0].any() else int(live[0].sum())
        prompts.append([int(t) for t in tokens[0, :first]] or [int(tokens[0, 0])])
        chosen.append([int(t) for t in tokens[0][scored[0]]])
        rejected.append([int(t) for t in tokens[1][scored[1]]])
    return prompts, chosen, rejected, weight
