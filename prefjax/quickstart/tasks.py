"""Synthetic tasks with a ground-truth reward anyone can verify.

    task = get_task("arithmetic")
    prompts = task.prompts(np.random.default_rng(0), 4)        # ["17+5=", ...]
    demo = task.demonstration(prompts[0], rng)                   # a noisy demonstrator's answer
    task.reward(prompts[0], "22")                                # 1.0 (correct) or 0.0

A task supplies prompts, a *noisy demonstrator* (the data supervised fine-tuning
imitates, so the SFT policy is sometimes right and sometimes not), and a reward
computed by a program, never by a model. The tasks:

- "arithmetic": "a+b=" -> the sum, character-level. Reward 1 for the exact sum,
  else 0. The demonstrator is right with probability `p_correct`; otherwise it
  makes a plausible slip (off by 1, 2 or 10).
- "sentiment": "the <subject> was" -> clauses like "very dull and quite superb",
  word-level. Reward = (positive - negative adjectives) / adjectives, from a fixed
  lexicon, in [-1, 1]: the DPO paper's controlled-sentiment setting with a lexicon
  standing in for the sentiment classifier. The demonstrator's adjectives lean
  positive or negative depending on the subject.

Rewards are defined on the response text alone given the prompt; an empty or
malformed response gets the task's lowest sensible value (0).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Sequence

import numpy as np


class Task(abc.ABC):
    """What the pipeline needs from a task (see the module docstring)."""

    name: str
    level: str  # "char": every character is a token; "word": whitespace-separated words are tokens
    reward_range: tuple[float, float]

    @abc.abstractmethod
    def symbols(self) -> list[str]:
        """Every token the task's texts use (characters or words), in a fixed order."""

    @abc.abstractmethod
    def prompts(self, rng: np.random.Generator, count: int) -> list[str]:
        """`count` prompts drawn independently."""

    @abc.abstractmethod
    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        """One response of the noisy demonstrator that supervised fine-tuning imitates."""

    @abc.abstractmethod
    def reward(self, prompt: str, response: str) -> float:
        """The ground-truth reward of `response` to `prompt`."""

    @property
    @abc.abstractmethod
    def max_response_tokens(self) -> int:
        """Tokens a sampled response may take, its end-of-sequence token included."""

    @property
    @abc.abstractmethod
    def max_prompt_tokens(self) -> int:
        """The longest prompt, in tokens."""

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """reward() for each (prompt, response), float64 [len(prompts)]."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return np.asarray([self.reward(p, r) for p, r in zip(prompts, responses)], np.float64)

    def expected_demonstrator_reward(self, prompts: Sequence[str], seed: int = 0, samples: int = 4) -> float:
        """Monte-Carlo mean reward of the demonstrator on `prompts` (what SFT can at best imitate)."""
        rng = np.random.default_rng(seed)
        values = [self.reward(p, self.demonstration(p, rng)) for p in prompts for _ in range(samples)]
        return float(np.mean(values))


# ------------------------------------------------------------------------------------ arithmetic


@dataclasses.dataclass
class Arithmetic(Task):
    """a+b= with a, b in [0, max_operand]; reward 1 for the exact sum (module docstring)."""

    max_operand: int = 29
    p_correct: float = 0.3
    slips: tuple[int, ...] = (-10, -2, -1, 1, 2, 10)

    name = "arithmetic"
    level = "char"
    reward_range = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ValueError(f"arithmetic task: max_operand must be >= 1, got {self.max_operand}")
        if not 0.0 <= self.p_correct <= 1.0:
            raise ValueError(f"arithmetic task: p_correct must be in [0, 1], got {self.p_correct}")
        if not self.slips or 0 in self.slips:
            raise ValueError(f"arithmetic task: slips must be non-empty and non-zero, got {self.slips}")

    def symbols(self) -> list[str]:
        return list("0123456789+=")

    def prompts(self, rng: np.random.Generator, count: int) -> list[str]:
        a, b = rng.integers(0, self.max_operand + 1, size=(2, count))
        return [f"{x}+{y}=" for x, y in zip(a, b)]

    @staticmethod
    def operands(prompt: str) -> tuple[int, int]:
        """(a, b) of a prompt "a+b="; ValueError naming the prompt otherwise."""
        left, plus, right = prompt.rstrip("=").partition("+")
        if not plus or not left.isdigit() or not right.isdigit() or not prompt.endswith("="):
            raise ValueError(f"arithmetic task: {prompt!r} is not a prompt of the form 'a+b='")
        return int(left), int(right)

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        total = sum(self.operands(prompt))
        if rng.random() < self.p_correct:
            return str(total)
        slips = [s for s in self.slips if total + s >= 0]
        return str(total + int(rng.choice(slips)))

    def reward(self, prompt: str, response: str) -> float:
        return float(response.strip() == str(sum(self.operands(prompt))))

    @property
    def max_response_tokens(self) -> int:
        return len(str(2 * self.max_operand + max(self.slips))) + 2  # digits, EOS, one spare

    @property
    def max_prompt_tokens(self) -> int:
        return 2 * len(str(self.max_operand)) + 2


# ------------------------------------------------------------------------------------- sentiment

POSITIVE = ("great", "brilliant", "moving", "funny", "charming", "superb", "clever", "fresh")
NEGATIVE = ("dull", "boring", "awful", "clumsy", "bland", "silly", "weak", "messy")
NEUTRAL = ("long", "quiet", "loud", "simple", "odd", "dark", "short", "plain")
ADVERBS = ("very", "quite", "rather", "really", "so", "a bit")
CONNECTIVES = ("and", "but", "yet")
# The demonstrator's (P(positive), P(negative)) adjective per subject: some subjects lean negative,
# so a good policy must learn to override the prompt's pull.
SUBJECTS = {
    "film": (0.3, 0.3), "plot": (0.2, 0.5), "acting": (0.35, 0.25), "music": (0.4, 0.2),
    "ending": (0.15, 0.55), "script": (0.25, 0.45), "cast": (0.4, 0.3), "pacing": (0.2, 0.4),
}


@dataclasses.dataclass
class Sentiment(Task):
    """Movie-review continuations scored by a fixed lexicon (module docstring)."""

    max_clauses: int = 3

    name = "sentiment"
    level = "word"
    reward_range = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.max_clauses < 1:
            raise ValueError(f"sentiment task: max_clauses must be >= 1, got {self.max_clauses}")

    def symbols(self) -> list[str]:
        adverbs = sorted({w for phrase in ADVERBS for w in phrase.split()})
        return ["the", "was", *SUBJECTS, *POSITIVE, *NEGATIVE, *NEUTRAL, *adverbs, *CONNECTIVES]

    def prompts(self, rng: np.random.Generator, count: int) -> list[str]:
        names = list(SUBJECTS)
        # The trailing space separates prompt and response words when the two are concatenated.
        return [f"the {names[i]} was " for i in rng.integers(0, len(names), size=count)]

    @staticmethod
    def subject(prompt: str) -> str:
        words = prompt.split()
        if len(words) != 3 or words[0] != "the" or words[2] != "was" or words[1] not in SUBJECTS:
            raise ValueError(f"sentiment task: {prompt!r} is not a prompt 'the <subject> was' with a subject "
                             f"in {list(SUBJECTS)}")
        return words[1]

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        p_pos, p_neg = SUBJECTS[self.subject(prompt)]
        words = []
        for clause in range(int(rng.integers(1, self.max_clauses + 1))):
            if clause:
                words.append(str(rng.choice(CONNECTIVES)))
            if rng.random() < 0.6:
                words.append(str(rng.choice(ADVERBS)))
            u = rng.random()
            lexicon = POSITIVE if u < p_pos else NEGATIVE if u < p_pos + p_neg else NEUTRAL
            words.append(str(rng.choice(lexicon)))
        return " ".join(words)

    def reward(self, prompt: str, response: str) -> float:
        self.subject(prompt)
        words = response.split()
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        adjectives = pos + neg + sum(w in NEUTRAL for w in words)
        return (pos - neg) / adjectives if adjectives else 0.0

    @property
    def max_response_tokens(self) -> int:
        return 4 * self.max_clauses + 2  # connective, two adverb words, adjective per clause; EOS; spare

    @property
    def max_prompt_tokens(self) -> int:
        return 3


TASKS = {"arithmetic": Arithmetic, "sentiment": Sentiment}


def get_task(name: str, **options: Any) -> Task:
    """The task `name` with its options (e.g. max_operand=29); errors name the valid choices."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks are: {sorted(TASKS)}")
    fields = {f.name for f in dataclasses.fields(TASKS[name])}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return TASKS[name](**options)
