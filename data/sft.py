"""Records -> token ids and labels, with the loss only where the model should learn.

Labels are shifted here, once: `labels[t]` is the token the model should predict at position t,
-100 (ignored) where that token is not a target. Three formats:

- prompt_response: the prompt rendered with the tokenizer's chat template (a user turn, then the
  assistant header), the response after it, then EOS so the model learns to stop. Targets: the
  response and EOS. Without a chat template the prompt is followed by a newline.
- chat: a `messages` list (role/content) rendered with the chat template. Targets: the tokens of
  every assistant turn (content and end-of-turn marker); system and user turns are masked.
- text: every token is a target; a long document is cut into windows of `max_seq_length`
  positions instead of being truncated, so all of its text is used.

`train_on_prompt` makes prompts, system and user turns targets too (some recipes want that).
Too long prompt_response or chat examples are truncated (the tail is cut) or dropped, per
`too_long`; examples left with no target are dropped. Both are counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from batch import IGNORE_INDEX


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


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, or its end of sequence if it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def _shift(ids: list[int], is_target: list[bool]) -> dict[str, list[int]]:
    labels = [token if target else IGNORE_INDEX for token, target in zip(ids[1:], is_target[1:], strict=True)]
    return {"input_ids": ids[:-1], "labels": labels}


def encode_prompt_response(
    tokenizer, prompt: str, response: str, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """input_ids and shifted labels, prompt masked (unless `train_on_prompt`), untruncated."""
    head = prompt_ids(tokenizer, prompt)
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _shift(head + tail, [train_on_prompt] * len(head) + [True] * len(tail))


def encode_answer(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    """A prompt's token ids and an answer's (the model's own) as one example, the answer the target."""
    return _shift(prompt + answer, [False] * len(prompt) + [True] * len(answer))


def encode_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> dict[str, list[int]]:
    """input_ids and shifted labels with only the assistant turns as targets (all, with `train_on_prompt`)."""
    if not tokenizer.chat_template:
        raise ValueError(f"data.format=chat: the tokenizer of {tokenizer.name_or_path} has no chat template")

    def render(turns: list[dict], generation_prompt: bool) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                turns, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
            )
        )

    ids = render(messages, False)
    is_target = [train_on_prompt] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant turn is what rendering through it adds to rendering up to its header.
        through_turn = render(messages[: i + 1], False)
        start, end = len(render(messages[:i], True)), len(through_turn)
        if ids[:end] != through_turn:
            raise ValueError(
                "data.format=chat: the chat template does not render conversations prefix by prefix"
            )
        is_target[start:end] = [True] * (end - start)
    return _shift(ids, is_target)


def encode_text(tokenizer, text: str, max_seq_length: int) -> list[dict[str, list[int]]]:
    """A document as consecutive windows of at most `max_seq_length` positions, every token a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = []
    for start in range(0, len(ids) - 1, max_seq_length):
        piece = ids[start : start + max_seq_length + 1]
        windows.append({"input_ids": piece[:-1], "labels": piece[1:]})
    return windows


def encode_records(
    tokenizer,
    records: list[dict],
    data_format: str,
    max_seq_length: int,
    too_long: str = "truncate",
    train_on_prompt: bool = False,
) -> tuple[list[dict], EncodeReport]:
    """Encode records of one format (keys prompt/response, messages, or text) and count what happened."""
    report = EncodeReport()
    examples = []
    for record in records:
        if data_format == "text":
            encoded = encode_text(tokenizer, record["text"], max_seq_length)
        else:
            if data_format == "chat":
                example = encode_chat(tokenizer, record["messages"], train_on_prompt)
            else:
                example = encode_prompt_response(
                    tokenizer, record["prompt"], record["response"], train_on_prompt
                )
            if len(example["input_ids"]) > max_seq_length:
                if too_long == "drop":
                    report.dropped_too_long += 1
                    continue
                report.truncated += 1
                example = {k: v[:max_seq_length] for k, v in example.items()}
            encoded = [example]
        for example in encoded:
            n_targets = sum(label != IGNORE_INDEX for label in example["labels"])
            if n_targets == 0:
                report.dropped_no_target += 1
                continue
            examples.append(example)
            report.examples += 1
            report.tokens += len(example["input_ids"])
            report.target_tokens += n_targets
    return examples, report
