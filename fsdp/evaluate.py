"""Held-out loss on every rank at once, the Evaluator that runs it through a training run, and
the forgetting report built from it.

Evaluation is the training forward without the backward: each rank runs its share of a held-out
set (data/loader.py `eval_batches`, the same number of micro-batches on every rank), sums its
token losses and target-token counts, and one all-reduce of the two sums gives the token-weighted
mean over the whole set: exactly what one process would compute on all of it, whatever N is.

FSDP's memory plan is kept: each decoder layer is gathered and freed as in training, the
micro-batch is at most the training one (by default) and no activation is kept for a backward
(no_grad), so evaluation needs no more memory than a training step. Without grad, FSDP2 reshards
the root too after its forward (in training it stays gathered for the backward), so nothing stays
gathered afterwards (tests/test_evaluate.py checks that every parameter is a shard again).

Forgetting (catastrophic forgetting, McCloskey & Cohen 1989): the general-English loss after
training minus before. The
domain gain is the domain loss before minus after. Both are in nats per target token; perplexity
is exp(loss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from batch import Batch
from durable import write_atomic, write_json
from fsdp.dist import print0
from fsdp.generate import Generation, greedy_generate, side_by_side
from fsdp.metrics import MetricsLogger


@dataclass
class EvalResult:
    loss: float  # token-weighted mean over the whole set, every rank's share
    target_tokens: int  # the whole set's
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 80.0))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], device: torch.device) -> EvalResult:
    """Token-weighted mean loss of this rank's `batches` and every other rank's; call on all ranks."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    # Summed in float64: the result must not depend on how the set was split into ranks.
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        sums[0] += model(batch.input_ids, batch.position_ids, batch.labels).double()
        sums[1] += batch.num_target_tokens
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, targets = sums.tolist()
    return EvalResult(loss_sum / max(targets, 1), int(targets), time.perf_counter() - start)


def describe(step: int, results: dict[str, EvalResult]) -> str:
    """One log line: each set's loss and perplexity."""
    sets = ", ".join(
        f"{name} loss {r.loss:.4f} (perplexity {r.perplexity:.2f})" for name, r in results.items()
    )
    seconds = sum(r.seconds for r in results.values())
    return f"eval at step {step}: {sets}; {seconds:.1f} s"


def scalars(results: dict[str, EvalResult]) -> dict[str, float]:
    """TensorBoard and metrics.jsonl names: eval/<set>/loss and eval/<set>/perplexity."""
    out = {}
    for name, r in results.items():
        out[f"eval/{name}/loss"] = r.loss
        out[f"eval/{name}/perplexity"] = r.perplexity
    return out


def forgetting_report(history: list[dict], examples: dict[str, int], target_tokens: dict[str, int]) -> dict:
    """eval.json: each set's loss before (the first evaluation) and after (the last), and the change.

    `history`: one row per evaluation, {"step": s, "<set>": loss, ...}, in step order.
    """
    first, last = history[0], history[-1]
    sets = {}
    for name in examples:
        before, after = first[name], last[name]
        sets[name] = {
            "examples": examples[name],
            "target_tokens": target_tokens[name],
            "loss_before": before,
            "loss_after": after,
            "change": after - before,
            "perplexity_before": math.exp(min(before, 80.0)),
            "perplexity_after": math.exp(min(after, 80.0)),
        }
    return {
        "before_step": first["step"],
        "after_step": last["step"],
        "sets": sets,
        # Positive is good for the first (the domain loss fell), bad for the second (general rose).
        "domain_gain": -sets["domain"]["change"] if "domain" in sets else None,
        "forgetting": sets["general"]["change"] if "general" in sets else None,
        "history": history,
    }


def format_forgetting(report: dict) -> str:
    """The one-screen summary: each set before and after, then domain gain against general cost."""
    lines = [
        f"forgetting report: held-out loss before step {report['before_step'] + 1} and after step "
        f"{report['after_step']} (nats per target token; lower is better)",
        f"  {'set':<8} {'examples':>8} {'tokens':>8} {'before':>8} {'after':>8} {'change':>8}   perplexity",
    ]
    for name, s in report["sets"].items():
        lines.append(
            f"  {name:<8} {s['examples']:>8,} {s['target_tokens']:>8,} {s['loss_before']:>8.4f} "
            f"{s['loss_after']:>8.4f} {s['change']:>+8.4f}   {s['perplexity_before']:.2f} -> {s['perplexity_after']:.2f}"
        )
    gain, forgetting = report["domain_gain"], report["forgetting"]
    if gain is not None:
        lines.append(f"  domain gain:  {gain:+.4f} (how much the domain loss fell)")
    if forgetting is not None:
        verdict = (
            "rose: the model forgot some" if forgetting > 0 else "did not rise: nothing forgotten on this set"
        )
        lines.append(f"  general cost: {forgetting:+.4f} (the general loss {verdict})")
    if gain and forgetting is not None and gain > 0:
        lines.append(f"  general cost per unit of domain gain: {forgetting / gain:+.3f}")
    return "\n".join(lines)


class Evaluator:
    """The evaluation of one run: held-out losses before the first step, every `every_steps` and
    after the last; greedy answers to the prompts before and after; the history of both, which
    travels in every checkpoint (state_dict), so a resumed run's "before" is still step 0.

    `sets`: this rank's eval batches per set name; `prompts`: (set, text, token ids) each;
    `decode` turns answer ids into text. Every method is called on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        sets: dict[str, list[Batch]],
        examples: dict[str, int],
        prompts: list[tuple[str, str, list[int]]],
        decode: Callable[[list[int]], str],
        generation: Generation,
        every_steps: int | None,
        device: torch.device,
        metrics: MetricsLogger,
    ):
        self.model, self.device, self.metrics = model, device, metrics
        self.sets, self.examples, self.every_steps = sets, examples, every_steps
        self.prompts, self.decode, self.generation = prompts, decode, generation
        self.history: list[dict] = []
        self.target_tokens: dict[str, int] = {}
        self.answers_before: list[str] = []
        self.answers_after: list[str] = []
        self.seconds = 0.0  # evaluation and generation, kept out of the training time

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "target_tokens": self.target_tokens,
            "answers_before": self.answers_before,
        }

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's history counts only if it evaluated the same sets."""
        state = state or {"history": [], "target_tokens": {}, "answers_before": []}
        if set(state["target_tokens"]) == set(self.sets) and state["history"]:
            self.history = list(state["history"])
            self.target_tokens.update(state["target_tokens"])
        self.answers_before = state["answers_before"]

    def begin(self, step: int) -> None:
        """Before training (or its resumption at `step`): the 'before' losses and answers, unless restored."""
        if not self.history:
            if step:
                print0(f"eval: the checkpoint has no evaluation of these sets; 'before' is step {step}")
            self.evaluate(step)
        if not self.generation.max_new_tokens:
            self.answers_before = []
        elif len(self.answers_before) != len(self.prompts):
            self.answers_before = self.answer()

    def evaluate_if_due(self, step: int, last_step: int) -> None:
        if self.every_steps and step % self.every_steps == 0 and step < last_step:
            self.evaluate(step)

    def finish(self, last_step: int) -> None:
        """After the last step: its losses (unless just taken) and the answers after training."""
        if not self.history or self.history[-1]["step"] != last_step:
            self.evaluate(last_step)
        self.answers_after = self.answer() if self.generation.max_new_tokens else []

    # Evaluation and generation run the layers eagerly under compile=true: their no-grad and KV-cache
    # graphs would each be compiled anew, for the few forwards they run.
    @torch.compiler.set_stance("force_eager")
    def evaluate(self, step: int) -> None:
        results = {name: evaluate(self.model, batches, self.device) for name, batches in self.sets.items()}
        if results:
            self.seconds += sum(r.seconds for r in results.values())
            self.metrics.log_extra(step, scalars(results))
            self.metrics.write(describe(step, results))
            self.history.append({"step": step, **{name: r.loss for name, r in results.items()}})
            self.target_tokens.update({name: r.target_tokens for name, r in results.items()})

    @torch.compiler.set_stance("force_eager")
    def answer(self) -> list[str]:
        """Greedy answers to every prompt, from the sharded model on all ranks (fsdp/generate.py)."""
        start = time.perf_counter()
        g = self.generation
        ids = [p[2] for p in self.prompts]
        new = greedy_generate(self.model, ids, g.max_new_tokens, g.stop_ids, g.pad_id, self.device)
        self.seconds += time.perf_counter() - start
        self.metrics.write(f"answered {len(ids)} prompts in {time.perf_counter() - start:.1f} s")
        return [self.decode(a) for a in new]

    def write_report(self, run_dir: Path, last_step: int) -> None:
        """Rank 0: eval.json and its one-screen summary; generations.json and generations.md."""
        if self.history:
            report = forgetting_report(self.history, self.examples, self.target_tokens)
            write_json(run_dir / "eval.json", report, indent=2)
            print0(format_forgetting(report))
        if self.answers_after:
            rows = [
                {"set": name, "prompt": prompt, "before": before, "after": after}
                for (name, prompt, _), before, after in zip(
                    self.prompts, self.answers_before, self.answers_after, strict=True
                )
            ]
            write_json(run_dir / "generations.json", rows, indent=2)
            before_step = self.history[0]["step"] if self.history else 0
            write_atomic(
                run_dir / "generations.md",
                side_by_side(rows, before_step, last_step, self.generation.max_new_tokens),
            )
            print0(f"answers before and after: {run_dir / 'generations.md'}")
