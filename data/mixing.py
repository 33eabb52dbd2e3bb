"""Mix general-purpose data into the domain data: the anchor against catastrophic forgetting.

`fraction` is the share of *examples* drawn from the general source (a sampling weight): with
fraction f and D domain examples, round(D * f / (1 - f)) general examples are drawn, reproducibly
from `seed` (without replacement while the general source has enough, with replacement past
that). Every domain example is kept. The realised shares of examples and of tokens are reported,
since a token share is what the model actually sees.

Mixing chooses examples by index; the tokens stay where they are (data/tokens.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass
class MixReport:
    domain_examples: int
    general_examples: int
    domain_tokens: int
    general_tokens: int

    @property
    def general_example_share(self) -> float:
        return self.general_examples / max(1, self.domain_examples + self.general_examples)

    @property
    def general_token_share(self) -> float:
        return self.general_tokens / max(1, self.domain_tokens + self.general_tokens)

    def describe(self) -> str:
        return (
            f"{self.domain_examples} domain + {self.general_examples} general examples: general share "
            f"{self.general_example_share:.1%} of examples, {self.general_token_share:.1%} of tokens"
        )


def mix(
    domain_lengths: np.ndarray, general_lengths: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, MixReport]:
    """The general examples to draw (their indices, in draw order), given every example's length;
    the loader shuffles them together with all the domain examples."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.general.fraction={fraction}: must be in [0, 1)")
    domain, general = len(domain_lengths), len(general_lengths)
    wanted = round(domain * fraction / (1 - fraction)) if fraction else 0
    if wanted and not general:
        raise ValueError("data.general: no general examples to mix in")
    rng = random.Random(seed)
    # Without replacement while the general source has enough, with replacement past that.
    indices = (
        rng.sample(range(general), wanted) if wanted <= general else rng.choices(range(general), k=wanted)
    )
    drawn = np.array(indices, dtype=np.int64)
    report = MixReport(
        domain_examples=domain,
        general_examples=len(drawn),
        domain_tokens=int(domain_lengths.sum()),
        general_tokens=int(general_lengths[drawn].sum()) if len(drawn) else 0,
    )
    return drawn, report
