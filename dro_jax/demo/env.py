"""The demo environment: instructions to follow, and a hidden rater (the "user").

A prompt asks to `shout`, `ask` or `say` a short made-up word, e.g. ``"shout: bakoru"``.
The user gives thumbs up only when the reply is exactly the word followed by the
punctuation they expect for that instruction::

    shout: w -> "w!"      ask: w -> "w?"      say: w -> "w."

The model is never told this rule. It sees demonstrations (for the SFT reference)
written by a careless demonstrator who follows the instruction only with probability
`follow_prob` and otherwise picks a punctuation mark at random, so a policy trained
by plain SFT follows the rule only partly (its sampled replies get roughly
``follow_prob + (1 - follow_prob) / 3`` thumbs up, less its copying mistakes).
The rater's labels carry configurable noise: each label is flipped with
probability `label_noise`. The *true* thumbs-up rate reported by the demo is the
noise-free one (the probability that a reply satisfies the user's rule).

Everything is generated from seeds; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Sequence

import numpy as np

INSTRUCTIONS = ("shout", "ask", "say")
PUNCTUATION = {"shout": "!", "ask": "?", "say": "."}
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class Environment:
    """The task distribution and the hidden rater.

    min_syllables/max_syllables: length of the made-up words (consonant-vowel syllables).
    follow_prob: how often the SFT demonstrator follows the instruction.
    label_noise: probability that the rater's thumbs up/down is flipped in a log.
    """

    min_syllables: int = 2
    max_syllables: int = 2
    follow_prob: float = 0.1
    label_noise: float = 0.1

    def __post_init__(self):
        if not 1 <= self.min_syllables <= self.max_syllables:
            raise ValueError(f"need 1 <= min_syllables <= max_syllables, got {self.min_syllables}, "
                             f"{self.max_syllables}")
        if not 0.0 <= self.follow_prob <= 1.0:
            raise ValueError(f"follow_prob must be in [0, 1], got {self.follow_prob}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")

    # ---- prompts -----------------------------------------------------------------
    def capacity(self) -> int:
        """How many distinct prompts there are."""
        return len(INSTRUCTIONS) * sum((len(_CONSONANTS) * len(_VOWELS)) ** k
                                       for k in range(self.min_syllables, self.max_syllables + 1))

    def max_draw(self) -> int:
        """The most prompts one `prompts` call may hold, its `exclude` included (rejection
        sampling stays fast)."""
        return self.capacity() // 2

    def word(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.min_syllables, self.max_syllables + 1))
        return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(n))

    def prompts(self, n: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
        """`n` distinct prompts (none in `exclude`), reproducible from `seed`."""
        rng = np.random.default_rng(seed)
        seen = set(exclude)
        out: list[str] = []
        if n + len(seen) > self.max_draw():
            raise ValueError(f"asked for {n} prompts besides {len(seen)} excluded; one draw may use at most "
                             f"{self.max_draw()} (half of this environment's {self.capacity()})")
        while len(out) < n:
            p = f"{INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]}: {self.word(rng)}"
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    # ---- the hidden rule -----------------------------------------------------------
    @staticmethod
    def parse(prompt: str) -> tuple[str, str]:
        instruction, _, word = prompt.partition(": ")
        if instruction not in PUNCTUATION or not word:
            raise ValueError(f"not a demo prompt: {prompt!r}")
        return instruction, word

    def ideal_response(self, prompt: str) -> str:
        instruction, word = self.parse(prompt)
        return word + PUNCTUATION[instruction]

    def follows_rule(self, prompt: str, response: str) -> bool:
        """The user's (noise-free) verdict: thumbs up?"""
        return response == self.ideal_response(prompt)

    def reward(self, prompt: str, response: str) -> float:
        """+1 for thumbs up, -1 for thumbs down (noise-free); usable as a gin reward callable."""
        return 1.0 if self.follows_rule(prompt, response) else -1.0

    def rate(self, prompts: Sequence[str], responses: Sequence[str], rng: np.random.Generator) -> list[bool]:
        """The rater's labels for a log: the rule's verdict, each flipped with prob. label_noise."""
        truth = np.array([self.follows_rule(p, r) for p, r in zip(prompts, responses)], bool)
        flip = rng.random(len(truth)) < self.label_noise
        return list(truth ^ flip)

    # ---- demonstrations ------------------------------------------------------------
    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        """A careless demonstrator's reply: right punctuation with prob. follow_prob, else random."""
        instruction, word = self.parse(prompt)
        if rng.random() < self.follow_prob:
            mark = PUNCTUATION[instruction]
        else:
            mark = PUNCTUATION[INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]]
        return word + mark

    def expected_demo_rate(self) -> float:
        return self.follow_prob + (1.0 - self.follow_prob) / len(INSTRUCTIONS)


def reward_fn(prompt: str, response: str) -> float:
    """The default environment's reward (+1/-1). For `python -m dro_jax.evaluate --prompts=...`:
    `--gin_file=gin_configs/demo/evaluate_reward.gin`, which binds
    `evaluate.reward_settings.reward_fn = @env.reward_fn` after `from __gin__ import
    dynamic_registration` and `from dro_jax.demo import env` (a --gin.X=@... flag alone cannot
    name this function: gin finds it only through such an import in a gin file)."""
    return Environment().reward(prompt, response)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 or n successes the bound is exactly 0 or 1 (float rounding would leave 5.6e-17)
    return (0.0 if successes <= 0 else max(0.0, centre - half), 1.0 if successes >= n else min(1.0, centre + half))


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """JSONL, written atomically through a uniquely named temporary file (see io_utils)."""
    from dro_jax import io_utils

    n = 0

    def lines():
        nonlocal n
        for r in records:
            yield json.dumps(r, ensure_ascii=False) + "\n"
            n += 1

    io_utils.write_text_atomically(path, lines())
    return n
