"""Records -> token ids and labels.

Prompt/response records: loss on the response only. The prompt is rendered with the tokenizer's chat template (a user turn, then the assistant
header), the response follows and ends with EOS, so the model learns to stop. Labels are shifted
here, once: `labels[t]` is the token the model should predict at position t, and -100 (ignored)
wherever that token is part of the prompt.

Plain text (continued pre-training, and the general data mixed in against forgetting): every token
is a target; a long document is cut into windows of `max_seq_length` positions instead of being
truncated, so all of its text is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsdp.loss import IGNORE_INDEX


@dataclass
class EncodeReport:
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_prompt_response(
    tokenizer, prompt: str, response: str, max_seq_length: int
) -> dict[str, list[int]]:
    """input_ids and shifted labels (prompt masked); at most `max_seq_length` positions (the tail is cut).

    `truncated` says whether the tail was cut.
    """
    head = prompt_ids(tokenizer, prompt)
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = head + tail
    targets = [IGNORE_INDEX] * len(head) + tail
    truncated = len(ids) - 1 > max_seq_length
    ids = ids[: max_seq_length + 1]
    return {"input_ids": ids[:-1], "labels": targets[1 : len(ids)], "truncated": truncated}


def encode_all(tokenizer, records: list[dict], max_seq_length: int) -> tuple[list[dict], EncodeReport]:
    report = EncodeReport()
    examples = []
    for record in records:
        example = encode_prompt_response(tokenizer, record["prompt"], record["response"], max_seq_length)
        report.truncated += example.pop("truncated")
        n_targets = sum(label != IGNORE_INDEX for label in example["labels"])
        if n_targets == 0:
            report.dropped_no_target += 1
            continue
        examples.append(example)
        report.examples += 1
        report.tokens += len(example["input_ids"])
        report.target_tokens += n_targets
    return examples, report


def encode_text(tokenizer, text: str, max_seq_length: int) -> list[dict[str, list[int]]]:
    """A document as consecutive windows of at most `max_seq_length` positions, every token a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = []
    for start in range(0, len(ids) - 1, max_seq_length):
        piece = ids[start : start + max_seq_length + 1]
        windows.append({"input_ids": piece[:-1], "labels": piece[1:]})
    return windows


def encode_texts(tokenizer, texts: list[str], max_seq_length: int) -> tuple[list[dict], EncodeReport]:
    report = EncodeReport()
    examples = [w for text in texts for w in encode_text(tokenizer, text, max_seq_length)]
    report.examples = len(examples)
    report.tokens = report.target_tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, report
