"""Pack short documents into fixed-length sequences, so a batch is tokens, not padding.

Documents (already encoded, labels shifted within each) are laid end to end, in order, into
sequences of at most `max_seq_length` positions; a document that does not fit in what is left of
the current sequence starts the next one (documents are never split, so no target crosses a
document boundary). `position_ids` restart at 0 at each document: Hugging Face models read that as
packed format and mask attention across documents (transformers 5, `find_packed_sequence_indices`,
for the sdpa, eager and flex backends; flash-attention uses the same positions for varlen kernels),
so a packed sequence computes exactly what its documents would compute one by one.

Packing works on the documents' lengths only: its result is where each sequence starts in the
list of documents (data/tokens.py `Sequences` holds it), so it costs memory per document, not
per token.
"""

from __future__ import annotations

import numpy as np


def pack(lengths: np.ndarray, max_seq_length: int) -> np.ndarray:
    """Greedy in-order packing of documents of `lengths` positions: the index of each sequence's
    first document, and the count of documents last (sequence j is documents starts[j]:starts[j+1])."""
    too_long = np.flatnonzero(lengths > max_seq_length)
    if len(too_long):
        raise ValueError(
            f"an example of {int(lengths[too_long[0]])} tokens is longer than max_seq_length={max_seq_length}"
        )
    starts, filled = [0], 0
    for i, n in enumerate(lengths.tolist()):  # one pass of plain ints: about 0.1 s per million documents
        if filled + n > max_seq_length:
            starts.append(i)
            filled = 0
        filled += n
    if len(lengths) == 0:
        return np.zeros(1, dtype=np.int64)
    starts.append(len(lengths))
    return np.array(starts, dtype=np.int64)
