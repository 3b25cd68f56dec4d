"""Sampling from the live policy and scoring with the reference, on the trainer's mesh.

    rollout = Rollout(setup, settings)                        # once, when the loop binds the source
    drawn = rollout.sample(state.params, prompt_ids, key)      # host numpy: tokens, log-probs, lengths
    drawn = rollout.sample(None, prompt_ids, key, who="reference")   # XPO's reference samples
    drawn = rollout.sample(state.params, prompt_ids, key, who="mixture")  # Nash-MD's opponent
    ref = rollout.reference_logps(prompt_ids, response_ids)    # [N] log pi_ref(response | prompt)

The sampler is prefjax.sampling.generate inside one jitted program that takes the train
state's own parameter arrays (`TrainState.params`, sharded as the step left them) and the
run's fixed weights: the policy's parameters are formed inside the program (a LoRA policy
is its base with the adapters applied), so nothing is copied, exported or resharded between
a train step and the next sampling. The reference is the run's starting weights: the LoRA
base (no copy), or for a fully trained policy one copy taken before the first step (the step
donates the state's buffers), cast to reference.dtype when set.

Every process passes the same prompts (the prompt stream is deterministic) and gets every
sample back (prefjax.sharding.to_host), so rewards and pairs are the same on every process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np

from prefjax import roles, sampling, scoring, sharding
from prefjax.batch import Batch

WHO = ("policy", "reference", "mixture")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the sampler does (static: each distinct value compiles once)."""

    max_new_tokens: int
    prompt_width: int  # prompts are right-padded to this many tokens
    stop_tokens: tuple[int, ...]
    pad_id: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    mixture_coef: float = 0.5

    @property
    def row_length(self) -> int:
        """Training rows: any prompt plus any sampled response."""
        return self.prompt_width + self.max_new_tokens


@dataclasses.dataclass
class Drawn:
    """Samples on the host, one row per (prompt, sample).

    Attributes:
      response_ids: the sampled tokens of each row up to and including its first stop token.
      logps: [N] the sampling model's untempered log-prob of each response (the policy's; for a
        mixture, the mixture's).
      sample_logps: [N] the log-prob under the distribution actually sampled from (temperature,
        top-k, top-p applied).
      policy_logps: [N] for mixture samples, the policy's own log-prob; else equal to logps.
      complete: [N] whether the row emitted a stop token.
    """

    response_ids: list[list[int]]
    logps: np.ndarray
    sample_logps: np.ndarray
    policy_logps: np.ndarray
    complete: np.ndarray


@functools.partial(jax.jit, static_argnames=("policy", "model", "settings", "who"))
def _generate(trainable: Any, fixed: roles.Fixed, reference: Any, prompts_NxP: jax.Array, lengths_N: jax.Array,
              rng: jax.Array, *, policy: roles.Policy, model: scoring.Model, settings: Settings,
              who: str) -> sampling.SampleOutput:
    live = None if trainable is None else policy.params(trainable, fixed)
    params, partner = {"policy": (live, None), "reference": (reference, None), "mixture": (live, reference)}[who]
    extra = {} if partner is None else dict(mixture_params=partner, mixture_coef=settings.mixture_coef)
    return sampling.generate(model.graphdef, params, model.cfg, prompts_NxP, lengths_N,
                             max_new_tokens=settings.max_new_tokens, rng=rng, temperature=settings.temperature,
                             top_k=settings.top_k, top_p=settings.top_p, stop_tokens=settings.stop_tokens,
                             pad_id=settings.pad_id, **extra)


@functools.partial(jax.jit, static_argnames=("model",))
def _sequence_logps(params: Any, batch: Batch, *, model: scoring.Model) -> jax.Array:
    return scoring.score(model, params, batch).logps[:, 0]


def _global(value: np.ndarray, mesh: jax.sharding.Mesh, rules: Any) -> jax.Array:
    """A host array every process holds in full -> a global array sharded over "batch"."""
    named = sharding.named_sharding(mesh, ("batch",) + (None,) * (value.ndim - 1), value.shape, rules)
    return jax.make_array_from_callback(value.shape, named, lambda index: value[index])


class Rollout:
    """Sampling and reference scoring for one run (module docstring)."""

    def __init__(self, setup: Any, settings: Settings, *, mesh: jax.sharding.Mesh, rules: Any,
                 needs_reference: bool):
        self.setup, self.settings, self.mesh, self.rules = setup, settings, mesh, rules
        self.model = scoring.Model(setup.model.cfg, setup.model.graphdef, setup.model.tiling)
        self.reference = self._reference_params(setup) if needs_reference else None

    @staticmethod
    def _reference_params(setup: Any) -> Any:
        """The starting weights: the LoRA base as it is, or a copy of the full policy's (taken now,
        before the first step donates the state's buffers)."""
        spec = setup.spec
        if spec.policy.lora is not None:
            return setup.fixed.base
        return roles.copy_params(setup.initial_params, spec.reference.dtype)

    def _check(self, who: str) -> None:
        if who not in WHO:
            raise ValueError(f"Rollout.sample: who={who!r}; choose one of {WHO}")
        if who != "policy" and self.reference is None:
            raise ValueError(f"Rollout.sample(who={who!r}) needs the reference weights (needs_reference=True)")

    def sample(self, trainable: Any, prompt_ids: Sequence[Sequence[int]], rng: jax.Array, *,
               who: str = "policy") -> Drawn:
        """One sample per prompt row (repeat a prompt for several samples)."""
        self._check(who)
        s = self.settings
        prompts = np.full((len(prompt_ids), s.prompt_width), s.pad_id, np.int32)
        for i, ids in enumerate(prompt_ids):
            if not 1 <= len(ids) <= s.prompt_width:
                raise ValueError(f"prompt row {i} has {len(ids)} tokens; it must have 1 to {s.prompt_width}")
            prompts[i, :len(ids)] = ids
        lengths = np.asarray([len(ids) for ids in prompt_ids], np.int32)
        out = _generate(trainable, self.setup.fixed, self.reference, _global(prompts, self.mesh, self.rules),
                        _global(lengths, self.mesh, self.rules), rng, policy=self.setup.spec.policy,
                        model=self.model, settings=s, who=who)
        tokens, n, logps, sample_logps, done = (sharding.to_host(x) for x in (
            out.tokens_BxN, out.lengths_B, out.logps_BxN, out.sample_logps_BxN, out.done_B))
        policy_logps = getattr(out, "policy_logps_BxN", None)
        policy_logps = logps if policy_logps is None else sharding.to_host(policy_logps)
        return Drawn(response_ids=[[int(t) for t in row[:k]] for row, k in zip(tokens, n)],
                     logps=logps.sum(-1).astype(np.float64), sample_logps=sample_logps.sum(-1).astype(np.float64),
                     policy_logps=np.asarray(policy_logps).sum(-1).astype(np.float64), complete=np.asarray(done, bool))

    def reference_logps(self, prompt_ids: Sequence[Sequence[int]],
                        response_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """[N] log pi_ref(response | prompt), summed over the response's tokens."""
        if self.reference is None:
            raise ValueError("Rollout.reference_logps needs the reference weights (needs_reference=True)")
        batch = Batch.from_sequences(prompt_ids, response_ids, self.settings.row_length, self.settings.pad_id)
        placed = jax.tree.map(lambda x: _global(np.asarray(x), self.mesh, self.rules), batch)
        return sharding.to_host(_sequence_logps(self.reference, placed, model=self.model)).astype(np.float64)
