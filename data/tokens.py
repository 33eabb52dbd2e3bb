"""Tokens in flat arrays: the form the data has on disk and in every rank's memory.

A part of the data (the domain's training examples, a held-out set, ...) is three arrays:

    tokens    every example's token ids end to end: uint16 where the vocabulary fits, else uint32
    targets   one byte per token: 1 where the token is a target (predicted from the tokens before it)
    offsets   int64, one more than the examples: example i is tokens[offsets[i]:offsets[i + 1]]

plus each example's target count, so nothing has to pass over every token at start. An example
of n + 1 tokens is n positions: the model reads tokens[:-1] and learns tokens[1:] where targets
says so, which is how `labels` are shifted everywhere else (batch.IGNORE_INDEX elsewhere).

On disk the arrays are raw files beside a meta.json; a rank maps them (numpy.memmap), so the pages
of one node's copy are shared by all its ranks through the page cache, and a rank's memory does
not grow with the data set. Nothing is unpickled, and a file of the wrong size is refused.

The training set (`Sequences`) is a list of sequences, each one example or several packed end to
end, described by index arrays into the parts: memory per example, never per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batch import IGNORE_INDEX

# array name -> its dtype on disk (tokens take the part's own: uint16 or uint32)
ARRAYS = {"tokens": None, "targets": np.uint8, "offsets": np.int64, "target_counts": np.int32}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: half the bytes for vocabularies up to 65,536."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class TokenArrays:
    """One part's examples as flat arrays (memory-mapped from the cache, or in memory)."""

    tokens: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray
    target_counts: np.ndarray  # per example: targets among its tokens after the first

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def input_lengths(self) -> np.ndarray:
        """Positions per example: its tokens but the last (which is only ever a label)."""
        return np.diff(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i's input ids and labels (int64; IGNORE_INDEX where not a target)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        tokens = self.tokens[start:end].astype(np.int64)
        labels = np.where(self.targets[start + 1 : end] != 0, tokens[1:], IGNORE_INDEX)
        return tokens[:-1], labels

    def example(self, i: int) -> dict[str, list[int]]:
        """Example i as lists (the held-out sets, small, are kept so)."""
        input_ids, labels = self.arrays(i)
        return {"input_ids": input_ids.tolist(), "labels": labels.tolist()}

    @classmethod
    def from_examples(cls, examples: list[dict]) -> TokenArrays:
        """Arrays from example dicts (input_ids, labels shifted by one), held in memory: for tests
        and sets built on the fly. The token after the last input is its label, or 0 when masked."""
        tokens, targets, lengths = [], [], []
        for number, e in enumerate(examples):
            ids, labels = list(e["input_ids"]), list(e["labels"])
            if len(ids) != len(labels) or not ids:
                raise ValueError(
                    f"example {number}: input_ids and labels must be non-empty and of one length"
                )
            if any(
                label != IGNORE_INDEX and label != nxt for label, nxt in zip(labels, ids[1:], strict=False)
            ):
                raise ValueError(f"example {number}: labels must be the input ids shifted by one")
            last = labels[-1] if labels[-1] != IGNORE_INDEX else 0
            tokens += [*ids, last]
            targets += [0, *(label != IGNORE_INDEX for label in labels)]
            lengths.append(len(ids) + 1)
        return cls.build(
            np.array(tokens, dtype=np.uint32), np.array(targets, dtype=np.uint8), np.array(lengths)
        )

    @classmethod
    def build(cls, tokens: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> TokenArrays:
        """Arrays from the tokens, targets and per-example token counts of consecutive examples."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(tokens, targets, offsets, count_targets(targets, offsets))

    def write(self, folder: Path, name: str) -> dict:
        """Append-free write of all four arrays (the cache writer streams instead: TokenArraysWriter)."""
        writer = TokenArraysWriter(folder, name, self.tokens.dtype)
        writer.append(self.tokens, self.targets, np.diff(self.offsets))
        return writer.close()

    @classmethod
    def open(cls, folder: Path, name: str, meta: dict) -> TokenArrays:
        """Map a part written by TokenArraysWriter; a file of the wrong size is refused (ValueError)."""
        dtypes = {**ARRAYS, "tokens": np.dtype(meta["dtype"])}
        counts = {
            "tokens": meta["tokens"],
            "targets": meta["tokens"],
            "offsets": meta["examples"] + 1,
            "target_counts": meta["examples"],
        }
        mapped = {}
        for array, dtype in dtypes.items():
            path = folder / f"{name}.{array}"
            expected = counts[array] * np.dtype(dtype).itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                found = "missing" if size is None else f"{size:,} bytes"
                raise ValueError(f"{path}: {found}, {expected:,} expected")
            mapped[array] = np.memmap(path, dtype=dtype, mode="r", shape=(counts[array],))
        return cls(**mapped)


def count_targets(targets: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Targets per example, the first token of each left out (it is never a label)."""
    starts = offsets[:-1]
    if not len(starts):
        return np.zeros(0, dtype=np.int32)
    sums = np.add.reduceat(targets, starts, dtype=np.int64) - targets[starts]
    return sums.astype(np.int32)


class TokenArraysWriter:
    """Streams a part's examples to `folder/name.*`, chunk by chunk, as the tokenizing workers
    deliver them: the process that writes never holds the whole part."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        self.files = {array: (folder / f"{name}.{array}").open("wb") for array in ARRAYS}
        self.files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.examples = self.tokens = 0

    def append(self, tokens: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> None:
        if len(tokens) and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"a token id {int(tokens.max())} does not fit in {self.dtype}")
        offsets = self.tokens + np.cumsum(lengths, dtype=np.int64)
        local = np.concatenate([[0], offsets - self.tokens])
        self.files["tokens"].write(tokens.astype(self.dtype).tobytes())
        self.files["targets"].write(targets.astype(np.uint8).tobytes())
        self.files["offsets"].write(offsets.tobytes())
        self.files["target_counts"].write(count_targets(targets, local).tobytes())
        self.examples += len(lengths)
        self.tokens += int(local[-1])

    def close(self) -> dict:
        """Close the files; returns what TokenArrays.open needs to map them."""
        for f in self.files.values():
            f.close()
        return {"examples": self.examples, "tokens": self.tokens, "dtype": self.dtype.name}


@dataclass
class Sequences:
    """The training set: sequences of one example each, or of several packed end to end.

    Piece k is example `piece_example[k]` of part `piece_part[k]`; sequence j is pieces
    starts[j]:starts[j + 1]. Packed sequences carry position ids that restart at each example."""

    parts: list[TokenArrays]
    piece_part: np.ndarray  # uint8 per piece
    piece_example: np.ndarray  # int64 per piece
    starts: np.ndarray  # int64, sequences + 1
    packed: bool = False

    def __post_init__(self) -> None:
        piece_lengths = np.zeros(len(self.piece_example), dtype=np.int64)
        piece_targets = np.zeros(len(self.piece_example), dtype=np.int64)
        for p, part in enumerate(self.parts):
            mine = self.piece_part == p
            piece_lengths[mine] = part.input_lengths[self.piece_example[mine]]
            piece_targets[mine] = part.target_counts[self.piece_example[mine]]
        # Positions and targets per sequence, for the loader's step totals and statistics.
        self.lengths = _sum_per_sequence(piece_lengths, self.starts)
        self.target_counts = _sum_per_sequence(piece_targets, self.starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def sequence(self, j: int) -> dict[str, np.ndarray]:
        """Sequence j's input_ids and labels (and position_ids, restarting per example, when packed)."""
        pieces = range(int(self.starts[j]), int(self.starts[j + 1]))
        parts = [self.parts[self.piece_part[k]].arrays(int(self.piece_example[k])) for k in pieces]
        sequence = {
            "input_ids": np.concatenate([ids for ids, _ in parts]),
            "labels": np.concatenate([labels for _, labels in parts]),
        }
        if self.packed:
            sequence["position_ids"] = np.concatenate([np.arange(len(ids)) for ids, _ in parts])
        return sequence

    @classmethod
    def one_per_example(
        cls, parts: list[TokenArrays], piece_part: np.ndarray, piece_example: np.ndarray
    ) -> Sequences:
        return cls(parts, piece_part, piece_example, np.arange(len(piece_example) + 1, dtype=np.int64))

    @classmethod
    def from_examples(cls, examples: list[dict]) -> Sequences:
        """Example dicts laid out as arrays in memory, one sequence each (tests, small sets)."""
        arrays = TokenArrays.from_examples(examples)
        n = len(arrays)
        return cls.one_per_example([arrays], np.zeros(n, dtype=np.uint8), np.arange(n, dtype=np.int64))


def _sum_per_sequence(per_piece: np.ndarray, starts: np.ndarray) -> np.ndarray:
    if len(starts) <= 1:
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(per_piece, starts[:-1]) if len(per_piece) else np.zeros(len(starts) - 1, np.int64)
