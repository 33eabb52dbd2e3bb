"""What a run reports as it goes: a progress bar, TensorBoard scalars and a JSON-lines log (rank 0 only)."""

from __future__ import annotations

import shutil
from pathlib import Path

from durable import AppendLog, read_jsonl, write_json

RESUMED = "resumed"  # a row {"step": S, "event": "resumed"}: an attempt resumed from checkpoint S


class MetricsLogger:
    """Rank 0 writes `metrics.jsonl` and TensorBoard events under the run folder; other ranks do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        """`start_step` > 0: a resumed run. The log keeps the rows up to that step and continues."""
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        self.previous_losses: list[float] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        jsonl = run_dir / "metrics.jsonl"
        if start_step and jsonl.is_file():
            # Rows past the checkpoint were logged by the attempt that died: they are redone now,
            # and a resume row tells readers to drop them (the log itself is never rewritten).
            self.previous_losses = [
                r["train/loss"] for r in read_metrics(jsonl) if r["step"] <= start_step and "train/loss" in r
            ]
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        else:
            # A fresh start (overwrite=true, or no checkpoint yet) must not leave old rows or
            # curves beside the new ones.
            jsonl.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = AppendLog(jsonl)
        if start_step:
            self.jsonl.write({"step": start_step, "event": RESUMED})
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One training step's row: TensorBoard, metrics.jsonl and the progress bar."""
        if not self.enabled:
            return
        self.log_extra(step, scalars)
        self.bar.set_postfix(
            loss=f"{scalars['train/loss']:.4f}",
            lr=f"{scalars['train/lr']:.2e}",
            tok_s=f"{scalars['train/tokens_per_s']:.0f}",
        )
        self.bar.update(1)

    def log_extra(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars outside the per-step row (checkpoint cost): TensorBoard and their own JSON line."""
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write({"step": step, **scalars})

    def write(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as the run's story: one row per step, in step order, every key's last value.

    The log holds every attempt of a run that was killed and resumed. A resume row at step S
    drops what earlier attempts logged past S (those steps were redone); torn rows are skipped.
    """
    steps: dict[int, dict] = {}
    for row in read_jsonl(path):
        if row.get("event") == RESUMED:
            steps = {s: r for s, r in steps.items() if s <= row["step"]}
        elif "step" in row:
            steps.setdefault(row["step"], {}).update(row)
    return [steps[s] for s in sorted(steps)]


def write_summary(
    run_dir: Path,
    steps: int,
    losses: list[float],
    *,
    train_seconds: float,
    eval_seconds: float,
    peaks: list[int],
    load_peaks: list[int],
    export_dir: Path | None,
) -> None:
    """Rank 0, at the end: summary.json and the closing lines."""
    summary = {
        "steps": steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "peak_rss_bytes_per_rank": peaks,
        "load_peak_rss_bytes_per_rank": load_peaks,
        "export": str(export_dir) if export_dir else None,
    }
    write_json(run_dir / "summary.json", summary, indent=2)
    print(
        f"done: {steps} steps in {train_seconds:.1f} s, loss {summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}; peak host memory per rank during training: "
        + ", ".join(f"{p / 2**30:.2f} GiB" for p in peaks),
        flush=True,
    )
    if export_dir:
        print(
            f"model written to {export_dir}; load it with "
            f"AutoModelForCausalLM.from_pretrained({str(export_dir)!r}) and "
            f"AutoTokenizer.from_pretrained({str(export_dir)!r})",
            flush=True,
        )
