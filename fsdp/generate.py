"""Greedy answers from the sharded model, on every rank at once: what the model says, before and after.

Why a sharded forward on all ranks rather than gathering the model on rank 0: gathering needs the
whole model in one rank's memory (16 GB in bf16 for an 8B model, on top of its training state),
while the sharded forward keeps FSDP's plan: each decoder layer is gathered just for its forward
and freed. The price is communication: every new token is one forward, so one all-gather of
every layer, and all prompts go in one left-padded batch to pay it once per token, not per prompt.

Every rank runs the same prompts through the same gathered weights, and each new token is rank 0's,
broadcast: so every rank holds the same answers, and ranks run the same number of forwards (each
forward is a round of collectives), since whether every answer has ended is decided from tokens
they share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Generation:
    """How answers are generated: at most `max_new_tokens` (0: none), ending at a stop token."""

    max_new_tokens: int
    stop_ids: set[int]
    pad_id: int


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    device: torch.device,
    keep_stop: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (token ids), greedy, ending at a stop token: without it, or
    with it (`keep_stop`: an answer that ran to `max_new_tokens` is the one without).

    `model` is a TrainableCausalLM (sharded or not): its forward with a KV cache returns the
    last position's logits. Call on every rank with the same arguments.
    """
    from transformers import DynamicCache

    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.causal_lm.config)

    answers: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = model(input_ids, position_ids, attention_mask=attention_mask, cache=cache)
        next_ids = logits.argmax(dim=-1)
        if dist.is_initialized():
            # Rank 0's choice is every rank's: two ranks whose logits differ in the last bit could
            # otherwise pick different tokens, answer differently and stop after different forwards.
            dist.broadcast(next_ids, src=0)
        for i, token in enumerate(next_ids.tolist()):
            if not ended[i]:
                ended[i] = token in stop_ids
                if keep_stop or not ended[i]:
                    answers[i].append(token)
        if all(ended):
            break
        # Only the new token goes in; the cache holds the keys and values of everything before it.
        input_ids = next_ids[:, None]
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
    model.train(was_training)
    return answers


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """The tokens that end an answer: the tokenizer's end of sequence and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, list | tuple) else {configured}
    return ids


def side_by_side(rows: list[dict], before_step: int, after_step: int, max_new_tokens: int) -> str:
    """generations.md: each prompt, its answer before training and after, in two columns."""

    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"

    lines = [
        f"# Answers before and after fine-tuning (greedy, at most {max_new_tokens} new tokens)",
        "",
        f"| set | prompt | before (step {before_step}) | after (step {after_step}) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {cell(row['prompt'])} | {cell(row['before'])} | {cell(row['after'])} |"
        )
    return "\n".join(lines) + "\n"
