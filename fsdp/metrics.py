"""What a run reports as it goes: a progress bar, TensorBoard scalars and a JSON-lines log (rank 0 only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class MetricsLogger:
    """Rank 0 writes `metrics.jsonl` and TensorBoard events under the run folder; other ranks do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        # A run written over (overwrite=true) must not leave its old curves beside the new ones.
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("w")
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        self.bar.set_postfix(
            loss=f"{scalars['train/loss']:.4f}",
            lr=f"{scalars['train/lr']:.2e}",
            tok_s=f"{scalars['train/tokens_per_s']:.0f}",
        )
        self.bar.update(1)

    def write(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
