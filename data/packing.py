"""Pack short documents into fixed-length sequences, so a batch is tokens, not padding.

Documents (already encoded, labels shifted within each) are laid end to end, in order, into
sequences of at most `max_seq_length` positions; a document that does not fit in what is left of
the current sequence starts the next one (documents are never split, so no target crosses a
document boundary). `position_ids` restart at 0 at each document: Hugging Face models read that as
packed format and mask attention across documents (transformers 5, `find_packed_sequence_indices`,
for the sdpa, eager and flex backends; flash-attention uses the same positions for varlen kernels),
so a packed sequence computes exactly what its documents would compute one by one.
"""

from __future__ import annotations


def pack(examples: list[dict], max_seq_length: int) -> list[dict]:
    """Greedy in-order packing. Each output has input_ids, labels and position_ids of equal length."""
    packed: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        n = len(example["input_ids"])
        if n > max_seq_length:
            raise ValueError(f"an example of {n} tokens is longer than max_seq_length={max_seq_length}")
        if len(current["input_ids"]) + n > max_seq_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += example["labels"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed
