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
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

import config
from config import banner, settings
from data.dataset import prepare as prepare_data
from data.loader import DistributedBatchLoader
from data.sft import pad_token_id, prompt_ids
from fsdp import faults, memory
from fsdp.adamw import init_state, make_adamw, param_groups
from fsdp.build import build_sharded_model
from fsdp.checkpoint import Checkpointer, CheckpointError, SaveFailed, remove_other_timeline, resolve_resume
from fsdp.dist import (
    Dist,
    exit_with_launcher,
    from_every_rank,
    init_distributed,
    print0,
    print_per_node,
    set_timeout,
    shutdown,
    speaks_for_node,
)
from fsdp.evaluate import Evaluator
from fsdp.export import export_hf, save_hf_files
from fsdp.generate import Generation, stop_token_ids
from fsdp.instruments import StepInstruments
from fsdp.metrics import MetricsLogger, write_summary
from fsdp.model import count_parameters, load_hf_config, resolve_model_folder
from fsdp.rundir import RunDirBusy, close_finished_run, finished_run, held_run_dir, start_writing
from fsdp.step import NonFiniteStep, check_finite, train_step


class Stop(Exception):
    """The run cannot go on; `code` is the exit status. `together`: every rank stops here at once
    (their process group can be closed in order); otherwise a rank stops alone, and exits."""

    def __init__(self, message: str, code: int = 2, together: bool = True):
        super().__init__(message)
        self.code, self.together = code, together


def main(argv: list[str]) -> int:
    exit_with_launcher()  # under torchrun: if torchrun alone is killed, this rank stops at once
    # 1. Configuration. Every bad value is reported here, in one line naming the key, before the
    #    process group exists, a model is touched, or a file is written.
    try:
        cfg = config.load_config(argv)
        precision = config.resolve_precision(cfg)  # auto: mixed where bf16 is native, else fp32
        config.validate(cfg, config.world_size_from_env())
    except config.ConfigError as err:
        # Each node's first rank says it (an error only one node's checkout has is still heard);
        # torchrun stops every rank as soon as one exits, so the others wait for that line.
        if speaks_for_node():
            print(f"config error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(3)
        return 2

    # 2. Process group, device and mesh (2-D for HSDP). From here every rank runs the same code.
    f = cfg.fsdp
    d = init_distributed(cfg.device, cfg.backend, f.replicate, f.cpu_offload, cfg.comm.init_timeout_s)
    torch.manual_seed(cfg.seed)
    # One way out: the process group is closed in order when the ranks stop together; a rank that
    # stops alone or crashes just exits (a barrier would wait forever) and torchrun stops the rest.
    together = False
    try:
        config.check_same_config(cfg, from_every_rank)  # every node composed the same config
        for warning in config.dubious_values(cfg):  # legal but likely a mistake: rank 0 says so once
            print0(f"config warning: {warning}", file=sys.stderr)
        # One live run per run_dir (rank 0's lock), one folder that every rank sees.
        with held_run_dir(Path(cfg.run_dir), d.is_main):
            run(cfg, d, precision)
        together = True
        return 0
    except (Stop, RunDirBusy, config.ConfigError) as stop:
        together = getattr(stop, "together", True)
        message = f"config error: {stop}" if isinstance(stop, config.ConfigError) else stop
        (print_per_node if together else partial(print, flush=True))(message, file=sys.stderr)
        return getattr(stop, "code", 2)
    finally:
        if together:
            shutdown()


def run(cfg, d: Dist, precision: str) -> None:
    # Resume: the checkpoint's files are verified (size, CRC-32), shared out among the ranks,
    # before anything heavy; resume=auto passes over a damaged one to the previous complete one.
    try:
        resume_from, resume_meta, warnings = resolve_resume(Path(cfg.run_dir), cfg.resume.path)
    except CheckpointError as err:
        raise Stop(f"checkpoint error: {err}") from None
    for warning in warnings:
        print0(f"resume: {warning}", file=sys.stderr)
    # A finished run stays finished: resume=auto says where its model is, and exports it again
    # from the final checkpoint only if that folder is missing or torn.
    run_dir, export = Path(cfg.run_dir), settings.export_target(cfg)
    if cfg.resume.path == "auto" and finished_run(run_dir, resume_meta, settings.run_length(cfg)):
        return close_finished_run(run_dir, resume_from, resume_meta["step"], export, d.is_main)

    # 3. Data, then 4. the model: meta-device build, activation checkpointing, one FSDP unit per
    #    decoder layer, then each rank allocates and reads only its own rows (not when resuming).
    model_folder, tokenizer, data, loader = load_data(cfg, d)
    total_steps = min(loader.steps_per_epoch * cfg.train.epochs, cfg.train.max_steps or sys.maxsize)
    memory.reset_peak_rss()  # the host's peak while loading goes to the banner
    load_start = time.perf_counter()
    hf_config = load_hf_config(model_folder, dict(cfg.model.config_overrides))
    pretrained = None if cfg.model.random_init else model_folder
    model = build_sharded_model(
        hf_config, d, settings.build_settings(cfg), pretrained, cfg.seed, load_weights=resume_from is None
    )
    loading = banner.loading_line(
        time.perf_counter() - load_start, load_peaks := from_every_rank(memory.peak_rss_bytes())
    )

    # 5. Optimizer and schedule. AdamW's moments take each parameter's sharding (and dtype, or
    #    optim.state_dtype); optim.impl: our loop (the reference), a multi-tensor one, torch's fused.
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings)
    optimizer = make_adamw(groups, **settings.adamw_settings(cfg))
    init_state(optimizer)  # m and v now, not at step 1: every step, the first included, holds them
    schedule = settings.lr_schedule(cfg, total_steps)

    # What the run will cost, per rank: the analytic model's bytes of one step (full-length
    # micro-batches) and the FLOPs per token; printed with everything above before training starts.
    shape = memory.ModelShape.from_hf_config(hf_config)
    predicted = memory.predict(shape, settings.workload(cfg, d.world_size, d.device.type, d.local_world_size))
    throughput = settings.throughput(cfg, shape, d.device)
    eval_sets = {n: e for n, e in data.eval_sets.items() if cfg.eval.sets is None or n in cfg.eval.sets}
    prompts = [("domain", p) for p in cfg.data.prompts] + [("general", p) for p in cfg.data.general.prompts]
    more = [
        *banner.data_lines(cfg, data, loader),
        loading,
        banner.eval_line(cfg, {n: len(e) for n, e in eval_sets.items()}, len(prompts)),
        banner.memory_line(cfg, predicted),
        throughput.describe(cfg.batch.max_seq_length),
    ]
    n_params = count_parameters(model)
    print0(banner.banner(cfg, d, hf_config, n_params, loader.geometry, schedule, precision, more))

    # Only now, with data and model ready, does the run write into its folder (rank 0); a fresh
    # start with overwrite=true first removes the old run's files, checkpoints included.
    if d.is_main:
        start_writing(run_dir, OmegaConf.to_yaml(cfg, resolve=True), cfg.overwrite and not resume_from)
        # A resume from an older checkpoint than run_dir's newest: refused without overwrite=true.
        if resume_from and cfg.resume.path != "auto" and cfg.overwrite:
            remove_other_timeline(run_dir, resume_from, resume_meta["step"])
    metrics = MetricsLogger(run_dir, d.is_main, total_steps, resume_meta["step"] if resume_meta else 0)

    # Held-out losses and greedy answers, before, during and after training (fsdp/evaluate.py).
    generation_config = getattr(model.causal_lm, "generation_config", None)
    batches = settings.eval_batching(cfg, d.rank, d.world_size, loader.pad_id)  # this rank's share of a set
    own = settings.own_answers(cfg, tokenizer, batches)  # the drift from its answers from before training
    evaluator = Evaluator(
        model,
        {n: batches(e) for n, e in eval_sets.items()},
        {n: len(e) for n, e in eval_sets.items()},
        [(name, text, prompt_ids(tokenizer, text)) for name, text in prompts],
        partial(tokenizer.decode, skip_special_tokens=True),
        Generation(cfg.eval.max_new_tokens, stop_token_ids(tokenizer, generation_config), loader.pad_id),
        cfg.eval.every_steps,
        d.device,
        metrics,
        own,
        settings.before_cache(cfg, precision, model_folder, eval_sets, own),
        set_keys=settings.eval_set_keys(eval_sets, own),
    )
    # A checkpoint holds the model, AdamW, the data position and the evaluation history, and a
    # resume restores all four (DCP reshards the first two to this world size).
    meta = {
        "fingerprint": config.resume_fingerprint(cfg, d.world_size),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "total_steps": total_steps,  # a checkpoint at this step is the run's last
    }
    hf_files = partial(
        save_hf_files, config=model.causal_lm.config, tokenizer=tokenizer, generation_config=generation_config
    )
    parts = {"loader": loader, "eval": evaluator}
    checkpointer = Checkpointer(
        run_dir,
        model,
        optimizer,
        parts,
        meta,
        settings.checkpoint_settings(cfg),
        d.is_main,
        hf_files,
        metrics,
    )
    try:
        start_step = checkpointer.restore(resume_from, resume_meta)
    except CheckpointError as err:
        raise Stop(f"checkpoint error: {err}") from None
    evaluator.begin(start_step)

    # The loop (6) is measured as it goes: time, throughput, memory, collectives.
    instrument_settings = settings.instrument_settings(cfg, loader.geometry)
    instruments = StepInstruments(
        model,
        optimizer,
        d,
        shape.vocab,
        throughput,
        predicted,
        instrument_settings,
        total_steps,
        run_dir,
        metrics,
    )
    memory.reset_peak_rss()
    set_timeout(cfg.comm.train_timeout_s)  # set-up is over: a collective now waits this long at most
    train_seconds = train_loop(
        cfg, d, model, optimizer, loader, schedule, instruments, evaluator, checkpointer, start_step
    )
    train_peaks = from_every_rank(memory.peak_rss_bytes())

    # 7. Forgetting: the held-out loss and the answers after training, beside those before.
    evaluator.finish(total_steps)
    metrics.close()
    if d.is_main:
        evaluator.write_report(run_dir, total_steps)

    # 8. Export: gathered tensor by tensor, written by rank 0; summary.json last, which marks the
    #    run finished (a later resume=auto only says so).
    if export:
        export_hf(model.causal_lm, export[0], tokenizer, *export[1:], d.is_main)
    if d.is_main:
        losses, seconds = instruments.losses, (train_seconds, evaluator.seconds)
        write_summary(run_dir, total_steps, losses, *seconds, train_peaks, load_peaks, export and export[0])


def train_loop(
    cfg, d, model, optimizer, loader, schedule, instruments, evaluator, checkpointer, start_step
) -> float:
    """6. The loop: per optimizer step, the lr, this rank's micro-batches, one train_step; then the
    step is logged, and the evaluator and the checkpointer each decide whether it is theirs.
    Returns the seconds spent training, evaluation left out."""
    model.train()
    run_start, eval_seconds_before = time.perf_counter(), evaluator.seconds
    clip, reduce_every, total_steps = (
        cfg.optim.max_grad_norm,
        cfg.fsdp.reduce_grads_every_microbatch,
        schedule.total_steps,
    )
    for step in range(start_step + 1, total_steps + 1):
        faults.begin_step(step)
        lr = schedule(step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with instruments.step(step, lambda: [b.to(d.device) for b in loader.next_step()]) as probe:
            stats = train_step(model, optimizer, probe.micro_batches, clip, reduce_every)
        try:
            # A NaN/Inf loss or gradient norm: the update was not applied; skip the step, or stop.
            if skipped := check_finite(
                stats, step, loader.state_dict(), loader.steps_per_epoch, cfg.train.on_nonfinite
            ):
                instruments.metrics.write(skipped)
        except NonFiniteStep as err:
            instruments.metrics.close()
            raise Stop(
                f"non-finite {err}; stopped before the optimizer step. Last good checkpoint: "
                f"{checkpointer.last_good()}. Resume with resume=auto, or pass over such steps with "
                "train.on_nonfinite=skip",
                code=3,
            ) from None
        instruments.log(probe, stats, lr)
        evaluator.evaluate_if_due(step, total_steps)
        try:
            checkpointer.save_if_due(step, total_steps)
        except SaveFailed as err:  # every rank raises it together: one line, exit status 2
            instruments.metrics.close()
            raise Stop(str(err)) from None
    return time.perf_counter() - run_start - (evaluator.seconds - eval_seconds_before)


def load_data(cfg, d: Dist) -> tuple:
    """Records -> token ids (prompt masked in the labels), general text mixed in, packed -> this
    rank's micro-batches. Tokenized once per node (its local rank 0) and cached; the others read."""
    from transformers import AutoTokenizer

    model_folder = resolve_model_folder(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    pad_id = pad_token_id(tokenizer)
    geometry = settings.geometry(cfg, d.world_size)
    try:
        data = prepare_data(
            cfg.data,
            tokenizer,
            geometry.max_seq_length,
            cfg.seed,
            d.is_node_main,
            from_every_rank,
            cfg.eval.max_examples,
        )
        loader = DistributedBatchLoader(data.train, geometry, d.rank, cfg.seed, pad_id)
    except (ValueError, FileNotFoundError) as err:
        # Found before any model exists or the run folder is written; every rank learns of it.
        raise Stop(f"data error: {err}") from None
    return model_folder, tokenizer, data, loader


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Every file is closed and the process group gone: nothing left needs collecting. Frozen, the
    # heap is spared the interpreter's last garbage collections, a walk over every object it holds.
    gc.freeze()
    sys.exit(code)
