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
training minus before; on the "unseen" set, general text of another kind that no run trains on,
where mixing general data in cannot flatter it. The domain gain is the domain loss before minus
after. All are in nats per target token; perplexity is exp(loss).

Own-answers drift: before training, the model answers general questions greedily and the answers
are kept (token ids, the end token included when it came); each evaluation is then the loss of the
current model on those answers ("own_answers"), a held-out set like the others. A model that would
still say what it said scores near its before-value (low: greedy answers are likely ones); one that
forgot rises. No second model is kept in memory: the reference is the answers themselves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from batch import Batch
from durable import write_atomic, write_json
from fsdp.dist import from_every_rank, print0
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


@dataclass
class OwnAnswers:
    """The drift measurement's parts: the questions (token ids), how long an answer may be, how a
    (prompt, answer) pair becomes an example (the answer the target) and examples this rank's eval
    batches; `answers`: the ones from before training."""

    prompts: list[list[int]]
    max_new_tokens: int
    encode: Callable[[list[int], list[int]], dict]
    batches: Callable[[list[dict]], list[Batch]]
    answers: list[list[int]] = field(default_factory=list)

    def eval_batches(self) -> list[Batch]:
        return self.batches([self.encode(p, a) for p, a in zip(self.prompts, self.answers, strict=True)])


def changed_sets(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The sets whose content differs between a checkpoint's keys and this run's (a set missing
    from either side's keys counts as changed: nothing says it is the same)."""
    return sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))


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

    def change(name: str) -> float | None:
        return sets[name]["change"] if name in sets else None

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
        # Positive is good for the first (the domain loss fell), bad for the others (general rose).
        "domain_gain": -sets["domain"]["change"] if "domain" in sets else None,
        "forgetting": change("general"),
        "forgetting_unseen": change("unseen"),
        "own_answers_drift": change("own_answers"),
        "history": history,
    }


def format_forgetting(report: dict) -> str:
    """The one-screen summary: each set before and after, then domain gain against general cost."""
    lines = [
        f"forgetting report: held-out loss before step {report['before_step'] + 1} and after step "
        f"{report['after_step']} (nats per target token; lower is better)",
        f"  {'set':<11} {'examples':>8} {'tokens':>8} {'before':>8} {'after':>8} {'change':>8}   perplexity",
    ]
    for name, s in report["sets"].items():
        lines.append(
            f"  {name:<11} {s['examples']:>8,} {s['target_tokens']:>8,} {s['loss_before']:>8.4f} "
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
    if report.get("forgetting_unseen") is not None:
        lines.append(f"  unseen cost:  {report['forgetting_unseen']:+.4f} (general text never trained on)")
    if report.get("own_answers_drift") is not None:
        lines.append(
            f"  own-answers drift: {report['own_answers_drift']:+.4f} (loss on the answers it gave "
            "before training; rising: it would now say something else)"
        )
    return "\n".join(lines)


class Evaluator:
    """The evaluation of one run: held-out losses before the first step, every `every_steps` and
    after the last; greedy answers to the prompts before and after; the history of both, which
    travels in every checkpoint (state_dict), so a resumed run's "before" is still step 0.

    `sets`: this rank's eval batches per set name; `prompts`: (set, text, token ids) each;
    `decode` turns answer ids into text; `own_answers`: the drift measurement, or None. Every
    method is called on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sets: dict[str, list[Batch]],
        examples: dict[str, int],
        prompts: list[tuple[str, str, list[int]]],
        decode: Callable[[list[int]], str],
        generation: Generation,
        every_steps: int | None,
        device: torch.device,
        metrics: MetricsLogger,
        own_answers: OwnAnswers | None = None,
        before_cache: Path | None = None,
        set_keys: dict[str, str] | None = None,
    ):
        self.model, self.device, self.metrics = model, device, metrics
        self.sets, self.every_steps, self.own = sets, every_steps, own_answers
        self.examples = {**examples, **({"own_answers": len(own_answers.prompts)} if own_answers else {})}
        self.prompts, self.decode, self.generation = prompts, decode, generation
        self.history: list[dict] = []
        self.target_tokens: dict[str, int] = {}
        self.answers_before: list[str] = []
        self.answers_after: list[str] = []
        self.seconds = 0.0  # evaluation and generation, kept out of the training time
        # The pretrained model's 'before' (losses, own answers) is the same for every run of the same
        # model, eval data and precision: kept in this file (its name is a key of all three).
        self.before_cache = before_cache
        # What each set holds (a digest of its examples, or of the own-answers questions): a
        # checkpoint's "before" counts only for the same sets, not merely sets of the same names.
        self.set_keys = dict(set_keys or {})
        self.changed: list[str] = []  # the sets a resumed checkpoint evaluated otherwise

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "target_tokens": self.target_tokens,
            "answers_before": self.answers_before,
            "own_answers": self.own.answers if self.own else [],
            "set_keys": self.set_keys,
        }

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's history counts only if it evaluated the same sets, example for example
        (own answers included: then the answers it kept are the reference, not the resumed model's).
        Otherwise its 'before' would be one set's loss beside another set's 'after'."""
        state = state or {"history": [], "target_tokens": {}, "answers_before": []}
        own = state.get("own_answers", [])
        same_questions = not self.own or len(own) == len(self.own.prompts)
        same_sets = set(state["target_tokens"]) == set(self.examples)
        self.changed = changed_sets(state.get("set_keys", {}), self.set_keys) if state["history"] else []
        if same_questions and same_sets and not self.changed and state["history"]:
            self.history = list(state["history"])
            self.target_tokens.update(state["target_tokens"])
            if self.own:
                self.own.answers = own
        self.answers_before = state["answers_before"]

    def begin(self, step: int) -> None:
        """Before training (or its resumption at `step`): the 'before' losses and answers, unless restored."""
        fresh = not self.history and step == 0
        if not self.history and not (fresh and self.read_before()):
            if self.own:  # the reference answers: this model's, before any (more) training
                self.own.answers = self.generate(self.own.prompts, self.own.max_new_tokens, keep_stop=True)
            if step:
                why = (
                    f"the set(s) {', '.join(self.changed)} differ from the ones the checkpoint evaluated"
                    if self.changed
                    else "the checkpoint has no evaluation of these sets"
                )
                print0(f"eval: {why}; 'before' is step {step}")
            self.evaluate(step)
            if fresh and self.before_cache and self.history:  # a run with no held-out set keeps nothing
                self.write_before()
        if not self.generation.max_new_tokens:
            self.answers_before = []
        elif len(self.answers_before) != len(self.prompts):
            self.answers_before = self.answer()

    def write_before(self) -> None:
        """Rank 0 keeps step 0's losses and own answers; every rank waits until they are kept."""
        if dist.get_rank() == 0:
            self.before_cache.parent.mkdir(parents=True, exist_ok=True)
            before = {"losses": self.history[0], "target_tokens": self.target_tokens}
            write_json(self.before_cache, {**before, "own_answers": self.own.answers if self.own else []})
        dist.barrier()

    def read_before(self) -> bool:
        """Step 0's losses and own answers from the cache, if every rank finds it there."""
        if self.before_cache is None or not all(from_every_rank(self.before_cache.is_file())):
            return False
        saved = json.loads(self.before_cache.read_text())
        self.history, self.target_tokens = [saved["losses"]], saved["target_tokens"]
        if self.own:
            self.own.answers = saved["own_answers"]
        losses = {n: loss for n, loss in saved["losses"].items() if n != "step"}
        results = {n: EvalResult(loss, self.target_tokens[n], 0.0) for n, loss in losses.items()}
        self.metrics.log_extra(0, scalars(results))
        self.metrics.write(describe(0, results) + f" (the pretrained model's, kept in {self.before_cache})")
        return True

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
        if self.own:
            results["own_answers"] = evaluate(self.model, self.own.eval_batches(), self.device)
        if results:
            self.seconds += sum(r.seconds for r in results.values())
            self.metrics.log_extra(step, scalars(results))
            self.metrics.write(describe(step, results))
            self.history.append({"step": step, **{name: r.loss for name, r in results.items()}})
            self.target_tokens.update({name: r.target_tokens for name, r in results.items()})

    def answer(self) -> list[str]:
        """Greedy answers to every prompt, as text."""
        ids = [p[2] for p in self.prompts]
        return [self.decode(a) for a in self.generate(ids, self.generation.max_new_tokens)]

    @torch.compiler.set_stance("force_eager")
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, keep_stop: bool = False
    ) -> list[list[int]]:
        """Greedy answers (token ids), from the sharded model on all ranks (fsdp/generate.py)."""
        start = time.perf_counter()
        generation = self.generation
        new = greedy_generate(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            stop_ids=generation.stop_ids,
            pad_id=generation.pad_id,
            device=self.device,
            keep_stop=keep_stop,
        )
        self.seconds += time.perf_counter() - start
        self.metrics.write(f"answered {len(prompts)} prompts in {time.perf_counter() - start:.1f} s")
        return new

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
