"""The two peers of `make bench`, on the same global batches as `train.py`: a bare loop and HF Trainer.

    python bench/peers.py bare --steps 8 --out bare.json                       # one process
    python bench/peers.py bare --precision fp32 --steps 8 --out bare.json      # mixed (the default) | bf16 | fp32
    torchrun --nproc_per_node=2 bench/peers.py trainer --steps 8 --out t.json   # HF Trainer, FSDP

Same data: the default job's task (medical terms and 20% general text, unpacked so every side
reads the same padded batches), the same seed, so the same global batches as train.py: its loader
picks a global batch's examples from the seed and the global batch size alone (data/loader.py).
Same work: AdamW(0.9, 0.95, eps 1e-8, weight decay 0.1), lr 5e-5 with 3 warmup steps and cosine
decay, clipping at 1.0, the loss a mean over every target token of the optimizer step, at the
precision train.py runs (--precision, which bench/compare.py resolves from `auto` for every side):

    mixed   fp32 weights and AdamW state, bf16 compute: bf16 autocast (Trainer: bf16=True)
    bf16    bf16 weights and AdamW state, no autocast (the closest to train.py's pure bf16)
    fp32    fp32 everywhere, no autocast

- bare: the physical limit of this machine for that work. The HF model (under autocast for mixed),
  forward with labels, backward, torch.optim.AdamW; no FSDP, no logging, batches built before the
  clock starts. One process.
- trainer: transformers.Trainer, with FSDP2 through Accelerate (fsdp_config version 2, one unit per
  decoder layer) when run on several ranks, its own loop, logging and data loader.

Each writes JSON: per-step seconds and tokens (non-padding), the last step's loss, peak RSS.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from durable import write_json  # noqa: E402 (after the path is set)

MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"  # --model: another HF folder (the harness test)
SEED = 0
WEIGHTS = {"mixed": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}  # by --precision
LR, WARMUP, BETAS, WD, CLIP = 5e-5, 3, (0.9, 0.95), 0.1, 1.0


def global_batches(model: Path, steps: int, global_batch: int, seq_len: int) -> tuple[list[list[dict]], int]:
    """The examples of train.py's first `steps` global batches (preset cpu-demo, unpacked), and the pad id."""
    from transformers import AutoTokenizer

    from batch import BatchGeometry
    from config import load_config
    from data.dataset import prepare
    from data.loader import DistributedBatchLoader
    from data.sft import pad_token_id

    cfg = load_config(["preset=cpu-demo", "data.packing=false"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = prepare(cfg.data, tokenizer, seq_len, seed=SEED)
    loader = DistributedBatchLoader(data.train, BatchGeometry(global_batch, 1, 1, seq_len), 0, SEED, 0)
    order = loader._permutation(0)
    batches = [
        [
            {k: v.tolist() for k, v in data.train.sequence(int(i)).items()}
            for i in order[s * global_batch : (s + 1) * global_batch]
        ]
        for s in range(steps)
    ]
    return batches, pad_token_id(tokenizer)


def hf_example(example: dict) -> dict:
    """Our example (labels already shifted) as Hugging Face wants it: labels aligned, HF shifts them."""
    ids = (
        example["input_ids"] + [example["labels"][-1]]
        if example["labels"][-1] != -100
        else example["input_ids"]
    )
    labels = [-100, *example["labels"][: len(ids) - 1]]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lr_at(step: int, total: int) -> float:
    """Linear warmup, cosine decay to zero: what Trainer's `cosine` schedule does."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return LR * 0.5 * (1 + math.cos(math.pi * progress))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def bare(
    model_dir: Path, steps: int, global_batch: int, micro_batch: int, seq_len: int, precision: str = "mixed"
) -> dict:
    from transformers import AutoModelForCausalLM

    batches, pad_id = global_batches(model_dir, steps, global_batch, seq_len)
    micro = [
        [
            collate([hf_example(e) for e in b[i : i + micro_batch]], pad_id)
            for i in range(0, global_batch, micro_batch)
        ]
        for b in batches
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=WEIGHTS[precision])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=1e-8,
    )
    seconds, tokens, losses = [], [], []
    for step, parts in enumerate(micro):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        targets = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)
        loss_sum = 0.0
        for p in parts:  # token-weighted: each micro-batch's sum over the step's target count
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "mixed"):
                logits = model(input_ids=p["input_ids"], attention_mask=p["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                p["labels"][:, 1:].flatten(),
                ignore_index=-100,
                reduction="sum",
            )
            (loss / targets).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(e["input_ids"]) for e in batches[step]))  # as train.py counts them
        losses.append(loss_sum / targets)
    return {"seconds": seconds, "tokens": tokens, "last_loss": losses[-1], "peak_rss_bytes": [peak_rss()]}


def trainer(
    model_dir: Path,
    steps: int,
    global_batch: int,
    micro_batch: int,
    seq_len: int,
    out: Path,
    precision: str = "mixed",
) -> dict | None:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batches, pad_id = global_batches(model_dir, steps, global_batch, seq_len)
    examples = [hf_example(e) for b in batches for e in b]  # in order: each G consecutive is a global batch

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(examples)

        def __getitem__(self, i: int) -> dict:
            return examples[i]

    class InOrder(Trainer):  # the global batches in train.py's order, not reshuffled
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    fsdp = (
        {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        }
        if world_size > 1
        else {}
    )
    args = TrainingArguments(
        output_dir=str(out.parent / "trainer-out"),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=global_batch // (micro_batch * world_size),
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,
        weight_decay=WD,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=1e-8,
        max_grad_norm=CLIP,
        bf16=precision == "mixed",  # autocast; bf16 weights (below) train without it
        use_cpu=True,
        ddp_backend="gloo",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=SEED,
        average_tokens_across_devices=True,
        **fsdp,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=WEIGHTS[precision])
    clock = StepClock()
    run = InOrder(
        model=model,
        args=args,
        train_dataset=Examples(),
        data_collator=lambda b: collate(b, pad_id),
        callbacks=[clock],
    )
    run.train()
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    local = {"peak_rss_bytes": peak_rss()}
    peaks = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(peaks, local["peak_rss_bytes"])
    else:
        peaks = [local["peak_rss_bytes"]]
    tokens = [sum(sum(1 for t in e["input_ids"]) for e in b) for b in batches]
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return {
        "seconds": clock.seconds,
        "tokens": tokens,
        "last_loss": float(losses[-1]),
        "peak_rss_bytes": peaks,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=("bare", "trainer"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--precision", choices=tuple(WEIGHTS), default="mixed")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    if args.peer == "bare":
        result = bare(args.model, args.steps, args.global_batch, args.micro_batch, args.seq, args.precision)
    else:
        result = trainer(
            args.model, args.steps, args.global_batch, args.micro_batch, args.seq, args.out, args.precision
        )
    if result is not None:
        write_json(args.out, result, indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
