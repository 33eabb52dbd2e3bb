"""fulltune: fully fine-tune a pretrained causal LM with FSDP2, in a loop you can read.

    python train.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=2 train.py              # the default cpu-demo job, 2 ranks on CPU
    torchrun --nproc_per_node=8 train.py preset=llama3-8b-8xh100 data=jsonl data.path=train.jsonl

The story of one run, top to bottom:
  1. configuration   composed from conf/ and checked, before anything heavy happens
  2. process group   one process per rank; gloo on CPU, NCCL on GPUs; rank 0 locks the run folder
  3. data            prompt/response records -> token ids with the prompt masked -> per-rank batches
  4. model           built on the meta device, checkpointed, sharded, then each rank loads its rows
  5. optimizer       our AdamW on the local shards, warmup + decay schedule; or a checkpoint's state
  6. the loop        accumulate micro-batches, one gradient reduction, clip, step; evaluate, save
  7. forgetting      held-out loss and answers before vs after: what was learned, what was forgotten
  8. export          a Hugging Face folder that `from_pretrained` loads
Mechanisms live in fsdp/ and data/; config/ turns the command line into what they take.
estimate.py (memory per rank) and explain.py (the sharding) study a run without training it.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

import config
from config import banner, settings
from data.dataset import PreparedData
from data.dataset import prepare as prepare_data
from data.loader import DistributedBatchLoader
from data.sft import pad_token_id
from fsdp import faults, memory
from fsdp.adamw import init_state, make_adamw, param_groups
from fsdp.build import build_sharded_model
from fsdp.checkpoint import (
    Checkpointer,
    CheckpointError,
    ResumePoint,
    SaveFailed,
    remove_other_timeline,
    resolve_resume,
)
from fsdp.dist import Dist, exit_with_launcher, from_every_rank, init_distributed, print0, set_timeout
from fsdp.evaluate import Evaluator
from fsdp.export import export_hf, save_hf_files
from fsdp.instruments import StepInstruments
from fsdp.metrics import MetricsLogger, write_summary
from fsdp.model import count_parameters, load_hf_config, resolve_model_folder
from fsdp.rundir import close_finished_run, finished_run, held_run_dir, start_writing
from fsdp.schedule import LRSchedule
from fsdp.step import NonFiniteStep, check_finite, train_step
from fsdp.stop import Stop, ending_in_order, refuse_before_start

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def main(argv: list[str]) -> int:
    exit_with_launcher()  # under torchrun: if torchrun alone is killed, this rank stops at once
    # 1. Configuration. Every bad value is reported here, in one line naming the key, before the
    #    process group exists, a model is touched, or a file is written.
    try:
        cfg = config.load_config(argv)
        precision = config.resolve_precision(cfg)  # auto: mixed where bf16 is native, else fp32
        config.validate(cfg, config.world_size_from_env())
    except config.ConfigError as err:
        return refuse_before_start(f"config error: {err}")

    # 2. Process group, device and mesh (2-D for HSDP). From here every rank runs the same code.
    distributed = init_distributed(
        device=cfg.device,
        backend=cfg.backend,
        replicate=cfg.fsdp.replicate,
        cpu_offload=cfg.fsdp.cpu_offload,
        timeout_s=cfg.comm.init_timeout_s,
    )
    torch.manual_seed(cfg.seed)
    # From here a stop is said once per node, with its exit status, and the ranks close the process
    # group together (a config or checkpoint error every rank finds too); a crash, or a rank that
    # stops alone, leaves the rest to torchrun.
    with ending_in_order(
        also={config.ConfigError: "config error: ", CheckpointError: "checkpoint error: "}
    ) as ending:
        config.check_same_config(cfg, from_every_rank)  # every node composed the same config
        for warning in config.dubious_values(cfg):  # legal but likely a mistake: rank 0 says so once
            print0(f"config warning: {warning}", file=sys.stderr)
        # One live run per run_dir (rank 0's lock), one folder that every rank sees.
        with held_run_dir(Path(cfg.run_dir), distributed.is_main):
            run(cfg, distributed, precision)
    return ending.code


def run(cfg: DictConfig, distributed: Dist, precision: str) -> None:
    run_dir = Path(cfg.run_dir)
    export = settings.export_target(cfg)  # where the Hugging Face folder goes, or None
    # Resume: the checkpoint's files are verified (size, CRC-32), shared out among the ranks,
    # before anything heavy; resume=auto passes over a damaged one to the previous complete one.
    resume = find_resume_point(cfg)
    # A finished run stays finished: resume=auto says where its model is, and exports it again
    # from the final checkpoint only if that folder is missing or torn.
    if cfg.resume.path == "auto" and finished_run(run_dir, resume.meta, settings.run_length(cfg)):
        close_finished_run(
            run_dir, checkpoint=resume.folder, step=resume.step, export=export, is_main=distributed.is_main
        )
        return

    # 3. Data: tokenized once per node and cached; this rank's micro-batches come from the loader.
    data = load_data(cfg, distributed)
    loader = data.loader
    total_steps = min(loader.steps_per_epoch * cfg.train.epochs, cfg.train.max_steps or sys.maxsize)

    # 4. The model: built on the meta device, activation checkpointing, one FSDP unit per decoder
    #    layer, then each rank allocates and reads only its own rows (not when resuming: the
    #    checkpoint is about to overwrite them).
    memory.reset_peak_rss()  # the host's peak while loading goes to the banner
    load_start = time.perf_counter()
    hf_config = load_hf_config(data.model_folder, dict(cfg.model.config_overrides))
    model = build_sharded_model(
        hf_config,
        distributed,
        settings.build_settings(cfg),
        pretrained=None if cfg.model.random_init else data.model_folder,
        seed=cfg.seed,
        load_weights=resume.folder is None,
    )
    load_seconds = time.perf_counter() - load_start
    load_peaks = from_every_rank(memory.peak_rss_bytes())

    # 5. Optimizer and schedule. AdamW's moments take each parameter's sharding (and dtype, or
    #    optim.state_dtype); optim.impl: our loop (the reference), a multi-tensor one, torch's fused.
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings)
    optimizer = make_adamw(groups, **settings.adamw_settings(cfg))
    init_state(optimizer)  # m and v now, not at step 1: every step, the first included, holds them
    schedule = settings.lr_schedule(cfg, total_steps)

    # What the run will cost, per rank: the analytic model's bytes of one step (full-length
    # micro-batches) and the FLOPs per token; printed with everything above before training starts.
    shape = memory.ModelShape.from_hf_config(hf_config)
    workload = settings.workload(
        cfg, distributed.world_size, distributed.device.type, distributed.local_world_size
    )
    predicted = memory.predict(shape, workload)
    throughput = settings.throughput(cfg, shape, distributed.device)
    eval_sets = settings.chosen_eval_sets(cfg, data.prepared.eval_sets)
    print0(
        banner.banner(
            cfg,
            distributed=distributed,
            hf_config=hf_config,
            n_params=count_parameters(model),
            data=data.prepared,
            loader=loader,
            schedule=schedule,
            precision_reason=precision,
            loading=banner.loading_line(load_seconds, load_peaks),
            eval_examples={name: len(examples) for name, examples in eval_sets.items()},
            predicted=predicted,
            throughput=throughput,
        )
    )

    # Only now, with data and model ready, does the run write into its folder (rank 0); a fresh
    # start with overwrite=true first removes the old run's files, checkpoints included.
    if distributed.is_main:
        start_writing(run_dir, OmegaConf.to_yaml(cfg, resolve=True), cfg.overwrite and not resume.folder)
        # A resume from an older checkpoint than run_dir's newest: refused without overwrite=true.
        if resume.folder and cfg.resume.path != "auto" and cfg.overwrite:
            remove_other_timeline(run_dir, resume.folder, resume.step)
    metrics = MetricsLogger(run_dir, distributed.is_main, total_steps, resume.step)

    # Held-out losses and greedy answers, before, during and after training (fsdp/evaluate.py).
    evaluator = settings.evaluator(
        cfg,
        model,
        tokenizer=data.tokenizer,
        eval_sets=eval_sets,
        pad_id=loader.pad_id,
        distributed=distributed,
        metrics=metrics,
        precision=precision,
        model_folder=data.model_folder,
    )
    # A checkpoint holds the model, AdamW, the data position and the evaluation history, and a
    # resume restores all four (DCP reshards the first two to this world size).
    checkpointer = Checkpointer(
        run_dir,
        model,
        optimizer,
        parts={"loader": loader, "eval": evaluator},
        meta=settings.checkpoint_meta(cfg, distributed.world_size, total_steps),
        settings=settings.checkpoint_settings(cfg),
        is_main=distributed.is_main,
        hf_files=partial(
            save_hf_files,
            config=model.causal_lm.config,
            tokenizer=data.tokenizer,
            generation_config=getattr(model.causal_lm, "generation_config", None),
        ),
        metrics=metrics,
    )
    start_step = checkpointer.restore(resume.folder, resume.meta)
    evaluator.begin(start_step)

    # 6. The loop, measured as it goes: time, throughput, memory, collectives.
    instruments = StepInstruments(
        model,
        optimizer,
        distributed=distributed,
        vocab_size=shape.vocab,
        throughput=throughput,
        predicted=predicted,
        settings=settings.instrument_settings(cfg, loader.geometry),
        total_steps=total_steps,
        run_dir=run_dir,
        metrics=metrics,
    )
    parts = RunParts(
        model=model,
        optimizer=optimizer,
        loader=loader,
        schedule=schedule,
        instruments=instruments,
        evaluator=evaluator,
        checkpointer=checkpointer,
    )
    memory.reset_peak_rss()
    set_timeout(cfg.comm.train_timeout_s)  # set-up is over: a collective now waits this long at most
    train_seconds = train_loop(cfg, parts, distributed.device, start_step)
    train_peaks = from_every_rank(memory.peak_rss_bytes())

    # 7. Forgetting: the held-out loss and the answers after training, beside those before.
    evaluator.finish(total_steps)
    metrics.close()
    if distributed.is_main:
        evaluator.write_report(run_dir, total_steps)

    # 8. Export: gathered tensor by tensor, written by rank 0; summary.json last, which marks the
    #    run finished (a later resume=auto only says so).
    if export:
        export_hf(model.causal_lm, export, data.tokenizer, distributed.is_main)
    if distributed.is_main:
        write_summary(
            run_dir,
            total_steps,
            instruments.losses,
            train_seconds=train_seconds,
            eval_seconds=evaluator.seconds,
            peaks=train_peaks,
            load_peaks=load_peaks,
            export_dir=export.folder if export else None,
        )


@dataclass(frozen=True)
class RunParts:
    """What the loop drives, each built above from the config."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DistributedBatchLoader
    schedule: LRSchedule
    instruments: StepInstruments
    evaluator: Evaluator
    checkpointer: Checkpointer


def train_loop(cfg: DictConfig, parts: RunParts, device: torch.device, start_step: int) -> float:
    """6. The loop. Returns the seconds spent training, evaluation left out."""
    model, optimizer, loader, instruments = parts.model, parts.optimizer, parts.loader, parts.instruments
    total_steps = parts.schedule.total_steps
    model.train()
    run_start = time.perf_counter()
    eval_seconds_before = parts.evaluator.seconds  # evaluations inside the loop are not training
    with loop_stops(parts):
        for step in range(start_step + 1, total_steps + 1):
            faults.begin_step(step)  # where a test injects a failure; nothing otherwise
            # This step's learning rate: warmup, then decay.
            lr = parts.schedule(step - 1)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # This rank's micro-batches of the step (a global batch = micro-batches x ranks).
            fetch_start = time.perf_counter()
            micro_batches = [batch.to(device) for batch in loader.next_step()]
            data_wait = time.perf_counter() - fetch_start

            # Forward and backward of each micro-batch, one gradient reduction, clip, AdamW step.
            with instruments.step(step, micro_batches, data_wait) as measured:
                stats = train_step(
                    model,
                    optimizer,
                    micro_batches,
                    max_grad_norm=cfg.optim.max_grad_norm,
                    reduce_grads_every_microbatch=cfg.fsdp.reduce_grads_every_microbatch,
                )
            # A NaN/Inf loss or gradient norm: the update was not applied; skip the step, or stop.
            skipped = check_finite(
                stats,
                step,
                position=loader.state_dict(),
                steps_per_epoch=loader.steps_per_epoch,
                policy=cfg.train.on_nonfinite,
            )
            if skipped:
                instruments.metrics.write(skipped)

            # Log the step; then the evaluator and the checkpointer each decide whether it is theirs.
            instruments.log(measured, stats, lr)
            parts.evaluator.evaluate_if_due(step, total_steps)
            parts.checkpointer.save_if_due(step, total_steps)
    return time.perf_counter() - run_start - (parts.evaluator.seconds - eval_seconds_before)


@dataclass(frozen=True)
class RunData:
    """The run's data, ready: the model folder its tokenizer came from, the prepared token arrays
    and held-out sets, and this rank's loader."""

    model_folder: Path
    tokenizer: PreTrainedTokenizerBase
    prepared: PreparedData
    loader: DistributedBatchLoader


def load_data(cfg: DictConfig, distributed: Dist) -> RunData:
    """Records -> token ids (prompt masked in the labels), general text mixed in, packed -> this
    rank's micro-batches. Tokenized once per node (its local rank 0) and cached; the others read."""
    from transformers import AutoTokenizer

    model_folder = resolve_model_folder(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    geometry = settings.geometry(cfg, distributed.world_size)
    try:
        prepared = prepare_data(
            cfg.data,
            tokenizer,
            geometry.max_seq_length,
            seed=cfg.seed,
            is_node_main=distributed.is_node_main,
            gather=from_every_rank,
            max_eval_examples=cfg.eval.max_examples,
        )
        loader = DistributedBatchLoader(
            prepared.train, geometry, rank=distributed.rank, seed=cfg.seed, pad_id=pad_token_id(tokenizer)
        )
    except (ValueError, FileNotFoundError) as err:
        # Found before any model exists or the run folder is written; every rank learns of it.
        raise Stop(f"data error: {err}") from None
    return RunData(model_folder, tokenizer, prepared, loader)


# --- The plumbing of the story above ----------------------------------------------------------


def find_resume_point(cfg: DictConfig) -> ResumePoint:
    """The verified checkpoint to resume from (or none: a fresh start), its warnings said once."""
    resume = resolve_resume(Path(cfg.run_dir), cfg.resume.path)
    for warning in resume.warnings:
        print0(f"resume: {warning}", file=sys.stderr)
    return resume


@contextmanager
def loop_stops(parts: RunParts) -> Iterator[None]:
    """The loop's two stops, each reached by every rank together: a non-finite step under
    train.on_nonfinite=stop (exit status 3), and a checkpoint that could not be saved (2)."""
    try:
        yield
    except NonFiniteStep as err:
        parts.instruments.metrics.close()
        raise Stop(
            f"non-finite {err}; stopped before the optimizer step. Last good checkpoint: "
            f"{parts.checkpointer.last_good()}. Resume with resume=auto, or pass over such steps with "
            "train.on_nonfinite=skip",
            code=3,
        ) from None
    except SaveFailed as err:
        parts.instruments.metrics.close()
        raise Stop(str(err)) from None


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Every file is closed and the process group gone: nothing left needs collecting. Frozen, the
    # heap is spared the interpreter's last garbage collections, a walk over every object it holds.
    gc.freeze()
    sys.exit(code)
