"""What a run reports as it goes: a progress bar, TensorBoard scalars and a JSON-lines log (rank 0 only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


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
        kept = []
        if start_step and jsonl.is_file():
            # Rows past the checkpoint were logged by the attempt that died: they are redone now.
            kept = [line for line in jsonl.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.previous_losses = [
                json.loads(line)["train/loss"] for line in kept if "train/loss" in json.loads(line)
            ]
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        else:
            # A run written over (overwrite=true) must not leave its old curves beside the new ones.
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = jsonl.open("w")
        for line in kept:
            self.jsonl.write(line + "\n")
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
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def write(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


def write_summary(
    run_dir: Path,
    steps: int,
    losses: list[float],
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
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
