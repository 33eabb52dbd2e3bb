"""Mix general-purpose data into the domain data: the anchor against catastrophic forgetting.

`fraction` is the share of *examples* drawn from the general source (a sampling weight): with
fraction f and D domain examples, round(D * f / (1 - f)) general examples are drawn, reproducibly
from `seed` (without replacement while the general source has enough, with replacement past
that). Every domain example is kept. The realised shares of examples and of tokens are reported,
since a token share is what the model actually sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


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


def mix(domain: list[dict], general: list[dict], fraction: float, seed: int) -> tuple[list[dict], MixReport]:
    """Domain examples plus a seeded draw of general ones (the loader shuffles them together)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.general.fraction={fraction}: must be in [0, 1)")
    wanted = round(len(domain) * fraction / (1 - fraction)) if fraction else 0
    if wanted and not general:
        raise ValueError("data.general: no general examples to mix in")
    rng = random.Random(seed)
    if wanted <= len(general):
        drawn = [general[i] for i in rng.sample(range(len(general)), wanted)]
    else:
        drawn = [general[i] for i in rng.choices(range(len(general)), k=wanted)]
    report = MixReport(
        domain_examples=len(domain),
        general_examples=len(drawn),
        domain_tokens=sum(len(e["input_ids"]) for e in domain),
        general_tokens=sum(len(e["input_ids"]) for e in drawn),
    )
    return domain + drawn, report
