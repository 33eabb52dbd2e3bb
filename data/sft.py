"""Records -> token ids and targets, with the loss only where the model should learn.

An example is a token sequence and, per token, whether it is a target: the model reads tokens[:-1]
and learns tokens[1:] where they are targets (data/tokens.py keeps them so; `labels`, shifted
once, are what leaves as dicts). Three formats:

- prompt_response: the prompt rendered with the tokenizer's chat template (a user turn, then the
  assistant header), the response after it, then EOS so the model learns to stop. Targets: the
  response and EOS. Without a chat template the prompt is followed by a newline.
- chat: a `messages` list (role/content) rendered with the chat template. Targets: the tokens of
  every assistant turn (content and end-of-turn marker); system and user turns are masked
  (data/chat.py finds the turns in one rendering of the conversation).
- text: every token is a target; a long document is cut into windows of `max_seq_length`
  positions instead of being truncated, so all of its text is used.

`train_on_prompt` makes prompts, system and user turns targets too (some recipes want that).
Too long prompt_response or chat examples are truncated (the tail is cut) or dropped, per
`too_long`; examples left with no target are dropped. Both are counted in the report.

Records are encoded in batches (`encode_batch`): the templates are rendered to text and the text
of a whole batch goes to the tokenizer in one call, which is where its speed is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from batch import IGNORE_INDEX
from data.chat import encode_conversations
from data.tokens import TokenArrays


@dataclass
class EncodeReport:
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def describe(self) -> str:
        return (
            f"{self.examples} examples, {self.tokens:,} tokens ({self.target_tokens:,} targets); "
            f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long, "
            f"{self.dropped_no_target} dropped with no target"
        )

    def add(self, other: EncodeReport) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class EncodedChunk:
    """A batch of records, encoded: its examples' tokens and targets end to end."""

    tokens: np.ndarray  # uint32
    targets: np.ndarray  # uint8, 1 where the token is a target
    lengths: np.ndarray  # int64, tokens per example (its positions + 1)
    report: EncodeReport = field(default_factory=EncodeReport)
    chat_fallbacks: int = 0  # conversations whose turns were found prefix by prefix (data/chat.py)

    def examples(self) -> list[dict[str, list[int]]]:
        """As example dicts (input_ids, shifted labels): for tests and small sets."""
        arrays = TokenArrays.build(self.tokens, self.targets, self.lengths)
        return [arrays.example(i) for i in range(len(arrays))]


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, or its end of sequence if it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of many texts in one call: a fast tokenizer's backend encodes them as a batch
    (the transformers wrapper around it costs about 15% more and returns the same ids; the backend's
    call without offsets about 20% less again)."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        # encode_batch_fast (tokenizers 0.21+) skips the character offsets, which nothing here reads.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
    return [tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in texts]


def rendered_prompts(tokenizer, prompts: list[str]) -> tuple[list[str], bool]:
    """The prompts as the text that precedes an answer: a user turn and the assistant's header in the
    chat template, or the prompt and a newline without one. The flag: whether the tokenizer should
    add its special tokens (BOS) to that text, which it does only where no template placed them."""
    if tokenizer.chat_template:
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        return tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False), False
    return [prompt + "\n" for prompt in prompts], True


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """One prompt's ids, as encode_batch encodes it (for generation and the own-answers questions)."""
    (text,), special = rendered_prompts(tokenizer, [prompt])
    return token_ids(tokenizer, [text], special)[0]


def encode_answer(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    """A prompt's token ids and an answer's (the model's own) as one example, the answer the target."""
    ids = prompt + answer
    is_target = [False] * len(prompt) + [True] * len(answer)
    labels = [token if target else IGNORE_INDEX for token, target in zip(ids[1:], is_target[1:], strict=True)]
    return {"input_ids": ids[:-1], "labels": labels}


def encode_batch(
    tokenizer,
    columns: dict[str, list],
    data_format: str,
    max_seq_length: int,
    *,
    too_long: str = "truncate",
    train_on_prompt: bool = False,
) -> EncodedChunk:
    """Encode a batch of records of one format, given as columns (prompt and response, messages,
    or text), and count what happened."""
    eos = tokenizer.eos_token_id
    if data_format == "text":
        documents = token_ids(tokenizer, columns["text"])
        # Windows of max_seq_length positions; consecutive windows share one token, the last
        # label of one being the first input of the next, so every token is learned once.
        windows = [
            (doc, start, min(start + max_seq_length + 1, len(doc) + 1))
            for doc in documents
            for start in range(0, len(doc), max_seq_length)
        ]
        pieces = (
            chain(doc[start:end], (eos,)) if end == len(doc) + 1 else doc[start:end]
            for doc, start, end in windows
        )
        lengths = np.array([end - start for _, start, end in windows], dtype=np.int64)
        first_target = np.zeros(len(windows), np.int64)  # every token a target
        return _examples(pieces, lengths, max_seq_length, too_long, first_target=first_target)
    if data_format == "chat":
        encoded = encode_conversations(tokenizer, columns["messages"], train_on_prompt)
        lengths = np.array([len(ids) for ids in encoded.ids], dtype=np.int64)
        targets = np.fromiter(chain.from_iterable(encoded.targets), dtype=np.uint8, count=int(lengths.sum()))
        chunk = _examples(encoded.ids, lengths, max_seq_length, too_long, targets=targets)
        chunk.chat_fallbacks = encoded.fallbacks
        return chunk
    texts, special = rendered_prompts(tokenizer, columns["prompt"])
    heads = token_ids(tokenizer, texts, special)
    tails = token_ids(tokenizer, columns["response"])
    pieces = (chain(head, tail, (eos,)) for head, tail in zip(heads, tails, strict=True))
    lengths = np.array(
        [len(head) + len(tail) + 1 for head, tail in zip(heads, tails, strict=True)], dtype=np.int64
    )
    first_target = (
        np.zeros(len(heads), np.int64) if train_on_prompt else np.array([len(h) for h in heads], np.int64)
    )
    return _examples(pieces, lengths, max_seq_length, too_long, first_target=first_target)


def _examples(
    pieces,
    lengths: np.ndarray,
    max_seq_length: int,
    too_long: str,
    *,
    first_target: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> EncodedChunk:
    """Flat arrays of the examples (`pieces`: each one's token ids), cut or dropped where longer than
    max_seq_length positions, and dropped where no target is left; done on whole arrays at once.

    Targets are each example's tokens from `first_target` on, or given per token (`targets`)."""
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(pieces), dtype=np.uint32, count=total)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    position = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)  # within its example
    if targets is None:
        targets = (position >= np.repeat(first_target, lengths)).astype(np.uint8)
    too_long_examples = lengths - 1 > max_seq_length
    kept_length = np.minimum(lengths, max_seq_length + 1)
    if too_long == "drop":
        kept_length = np.where(too_long_examples, 0, kept_length)
    keep = position < np.repeat(kept_length, lengths)
    # Targets per example, its first token left out (it is never a label).
    counted = np.where(keep & (position > 0), targets, 0)
    target_counts = np.add.reduceat(counted, starts) if total else np.zeros(0, np.int64)
    no_target = (kept_length > 0) & (target_counts == 0)
    kept_length = np.where(no_target, 0, kept_length)
    keep &= np.repeat(kept_length > 0, lengths)
    kept = kept_length > 0
    report = EncodeReport(
        examples=int(kept.sum()),
        truncated=int(too_long_examples.sum()) if too_long != "drop" else 0,
        dropped_too_long=int(too_long_examples.sum()) if too_long == "drop" else 0,
        dropped_no_target=int(no_target.sum()),
        tokens=int((kept_length[kept] - 1).sum()),
        target_tokens=int(target_counts[kept].sum()),
    )
    return EncodedChunk(tokens=ids[keep], targets=targets[keep], lengths=kept_length[kept], report=report)


def encode_records(
    tokenizer,
    records: list[dict],
    data_format: str,
    max_seq_length: int,
    *,
    too_long: str = "truncate",
    train_on_prompt: bool = False,
) -> tuple[list[dict], EncodeReport]:
    """encode_batch for records as dicts, its examples as dicts (input_ids, shifted labels)."""
    names = {"text": ("text",), "chat": ("messages",)}.get(data_format, ("prompt", "response"))
    columns = {name: [record[name] for record in records] for name in names}
    chunk = encode_batch(
        tokenizer,
        columns,
        data_format,
        max_seq_length=max_seq_length,
        too_long=too_long,
        train_on_prompt=train_on_prompt,
    )
    return chunk.examples(), chunk.report


def encode_prompt_response(
    tokenizer, prompt: str, response: str, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """One record's input_ids and shifted labels, prompt masked (unless `train_on_prompt`), untruncated."""
    record = {"prompt": prompt, "response": response}
    (example,), _ = encode_records(
        tokenizer, [record], "prompt_response", 1 << 30, train_on_prompt=train_on_prompt
    )
    return example


def encode_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> dict[str, list[int]]:
    """One conversation's input_ids and shifted labels, the assistant turns the targets."""
    (example,), _ = encode_records(
        tokenizer, [{"messages": messages}], "chat", 1 << 30, train_on_prompt=train_on_prompt
    )
    return example


def encode_text(tokenizer, text: str, max_seq_length: int) -> list[dict[str, list[int]]]:
    """A document as consecutive windows of at most `max_seq_length` positions, every token a target."""
    return encode_records(tokenizer, [{"text": text}], "text", max_seq_length)[0]
