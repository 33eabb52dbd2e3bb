"""Self-replay data: the pretrained model's own answers to general questions, to mix in instead of
general text (what practitioners do when they have no general instruction data of their own).

    python -m experiments.self_replay --out .cache/data/self-replay     (make forgetting runs it first)

Before any fine-tuning, the model answers the questions of data/samples/replay-questions.txt
greedily, on one process, in fp32. None of them is among the questions whose answers measure the
own-answers drift (data/samples/general-questions.txt): replaying those would measure the drift
on what was trained on. An answer that ran to the length limit without ending is dropped, since
training on it would teach the model to stop mid-sentence. The result, train.jsonl, is a
prompt/response file for `data.general.path=... data.general.format=prompt_response`. It is
built again only when the model, the questions or the length limit change (meta.json's key).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from data.dataset import file_fingerprint
from data.sft import pad_token_id, prompt_ids
from data.sources import read_questions
from data.tasks import write_jsonl
from durable import publish_folder, write_json
from fsdp.generate import greedy_generate, stop_token_ids
from fsdp.model import TrainableCausalLM

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "data" / "samples" / "replay-questions.txt"
MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


def answer_questions(model_folder: Path, questions: list[str], max_new_tokens: int) -> list[dict]:
    """Each question and the model's greedy answer, for the answers that ended within the limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    causal_lm = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    stops = stop_token_ids(tokenizer, causal_lm.generation_config)
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    answers = greedy_generate(
        TrainableCausalLM(causal_lm),
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        pad_id=pad_token_id(tokenizer),
        device=torch.device("cpu"),
        keep_stop=True,
    )
    return [
        {"prompt": q, "response": tokenizer.decode(a[:-1], skip_special_tokens=True).strip()}
        for q, a in zip(questions, answers, strict=True)
        if a and a[-1] in stops
    ]


def build(
    out: Path, model_folder: Path = MODEL, questions_file: Path = QUESTIONS, max_new_tokens: int = 64
) -> dict:
    """out/train.jsonl and out/meta.json, unless out already holds them for the same key."""
    questions = read_questions(questions_file)
    key = {"model": file_fingerprint(model_folder), "questions": questions, "max_new_tokens": max_new_tokens}
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["key"] == key:
        return json.loads(meta_path.read_text())
    start = time.perf_counter()
    records = answer_questions(model_folder, questions, max_new_tokens)
    meta = {
        "key": key,
        "questions": len(questions),
        "answers kept": len(records),
        "seconds": round(time.perf_counter() - start, 1),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_jsonl(records, tmp / "train.jsonl")
    write_json(tmp / "meta.json", meta, indent=2)
    publish_folder(tmp, out)
    return meta


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "data" / "self-replay")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    meta = build(args.out, args.model, QUESTIONS, args.max_new_tokens)
    print(
        f"self-replay: {meta['answers kept']} of {meta['questions']} answers ended within "
        f"{args.max_new_tokens} tokens -> {args.out / 'train.jsonl'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
