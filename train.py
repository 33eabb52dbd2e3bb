"""fulltune: fully fine-tune a pretrained causal LM with FSDP2, in a loop you can read.

    python train.py                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node=2 train.py              # the default cpu-demo job, 2 ranks on CPU
    torchrun --nproc_per_node=8 train.py preset=llama3-8b-8xh100 data=jsonl data.path=train.jsonl

The story of one run, top to bottom:
  1. configuration   composed from conf/ and checked, before anything heavy happens
  2. process group   one process per rank; gloo on CPU, NCCL on GPUs
  3. data            prompt/response records -> token ids with the prompt masked -> per-rank batches
  4. model           built on the meta device, checkpointed, sharded, then each rank loads its rows
  5. optimizer       our AdamW on the local shards, warmup + decay schedule
  6. the loop        evaluate; accumulate micro-batches, one gradient reduction, clip, step; evaluate
  7. forgetting      held-out loss and answers before vs after: what was learned, what was forgotten
  8. export          a Hugging Face folder that `from_pretrained` loads
Mechanisms live in fsdp/ (sharding, precision, optimizer, loss, memory) and data/.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from data.dataset import prepare as prepare_data
from data.loader import Batch, DistributedBatchLoader, eval_batches
from data.sft import prompt_ids
from fsdp import comm, evaluate, faults, memory
from fsdp.activation import apply_activation_checkpointing, checkpointed_layers
from fsdp.adamw import AdamW, param_groups
from fsdp.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    export_hf,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_hf_files,
)
from fsdp.config import (
    ConfigError,
    grad_accum_steps,
    load_config,
    resume_fingerprint,
    validate,
    world_size_from_env,
)
from fsdp.dist import Dist, init_distributed, print0, shutdown
from fsdp.flops import FlopsModel, device_peak_tflops
from fsdp.generate import greedy_generate, side_by_side, stop_token_ids
from fsdp.metrics import MetricsLogger
from fsdp.model import (
    TrainableCausalLM,
    build_model,
    count_parameters,
    find_decoder_layer_names,
    load_hf_config,
    load_pretrained,
    materialize,
    resolve_model_folder,
)
from fsdp.schedule import BatchGeometry, LRSchedule, warmup_steps
from fsdp.shard import PARAM_DTYPE, describe_units, shard_model


def build_sharded_model(
    hf_config,
    d: Dist,
    precision: str = "mixed",
    checkpointing: str = "none",
    every_k: int = 1,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    chunk_tokens: int = 1024,
    pretrained: Path | None = None,
    seed: int = 0,
    load_weights: bool = True,
) -> TrainableCausalLM:
    """The HF model for `hf_config`, wrapped for training, checkpointed and sharded over `d.mesh`.

    With `pretrained`, the model is built on the meta device and each rank reads only its rows of
    the weights (not when `load_weights` is false: a checkpoint is about to overwrite them); without,
    it is initialized from `seed` on the host (small models only) and sharded.
    """
    dtype = PARAM_DTYPE[precision]
    model = TrainableCausalLM(
        build_model(hf_config, dtype, on_meta=pretrained is not None, seed=seed), chunk_tokens
    )
    layer_names = find_decoder_layer_names(model)
    apply_activation_checkpointing(model, layer_names, checkpointing, every_k)
    shard_model(model, layer_names, d.mesh, precision, reshard_after_forward, cpu_offload)
    if pretrained is not None:
        materialize(model, d.device)
        if load_weights:
            load_pretrained(model.causal_lm, pretrained)
    return model


@dataclass
class StepStats:
    loss: float  # token-weighted mean over the global batch
    grad_norm: float  # before clipping
    target_tokens: int  # global
    tokens: int  # global, non-padding
    finite: bool = True  # False: loss or gradient norm was NaN/Inf and the optimizer did not step
    seconds: dict[str, float] | None = None  # forward, backward, optimizer (clip + step + zero)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    max_grad_norm: float | None = None,
    reduce_grads_every_microbatch: bool = False,
) -> StepStats:
    """One optimizer step over this rank's micro-batches; every rank calls it with the same count."""
    # The loss denominator is the target-token count of the whole step, over every rank: counted
    # and all-reduced before the first forward, so every rank divides by the same number.
    device = micro_batches[0].input_ids.device  # NCCL reduces only tensors on the GPU
    local_counts = [sum(b.num_target_tokens for b in micro_batches), sum(b.num_tokens for b in micro_batches)]
    counts = torch.tensor(local_counts, device=device)
    dist.all_reduce(counts)
    global_targets, global_tokens = (int(memory.host_float(c, placeholder=1)) for c in counts)

    seconds = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
    clock = PhaseClock(device, seconds)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        # Gradients are reduce-scattered once, after the last micro-batch; before that each rank
        # accumulates its unsharded gradients locally (memory for communication).
        model.set_requires_gradient_sync(is_last or reduce_grads_every_microbatch)
        micro_loss_sum = faults.loss(model(batch.input_ids, batch.position_ids, batch.labels), i)
        clock.lap("forward")
        (micro_loss_sum / max(global_targets, 1)).backward()
        clock.lap("backward")
        loss_sum += micro_loss_sum.detach().float()
        faults.point("micro", i)

    # Gradients of every shard, one global norm: clip_grad_norm_ all-reduces the squared norms.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    dist.all_reduce(loss_sum)
    loss = memory.host_float(loss_sum, placeholder=0.0) / max(global_targets, 1)  # fake tensors: no value
    norm = memory.host_float(grad_norm, placeholder=0.0)
    # A NaN or Inf anywhere reaches every rank through these two reductions: all ranks agree to
    # skip the update, which would otherwise write NaN into every parameter and moment.
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return StepStats(loss, norm, global_targets, global_tokens, finite, seconds)


class PhaseClock:
    """Wall time per phase of a step. On a GPU it waits for the queued kernels at each lap, so a
    phase is charged for its own work (at the cost of a little overlap between phases)."""

    def __init__(self, device: torch.device, seconds: dict[str, float]):
        self.cuda = device.type == "cuda"
        self.seconds = seconds
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


def main(argv: list[str]) -> int:
    # 1. Configuration. Every bad value is reported here, in one line naming the key, before the
    #    process group exists, a model is touched, or a file is written.
    try:
        cfg = load_config(argv)
        validate(cfg, world_size_from_env())
    except ConfigError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"config error: {err}", file=sys.stderr)
        return 2

    if cfg.memory.estimate:
        return estimate_memory(cfg)
    if cfg.explain:
        return explain_sharding(cfg)

    # 2. Process group and device. From here on every rank runs the same code on its own data.
    d = init_distributed(cfg.device, cfg.backend)
    torch.manual_seed(cfg.seed)

    # Resume: the checkpoint's files are verified (size, CRC-32), shared out among the ranks,
    # before anything heavy; resume=auto passes over a damaged one to the previous complete one,
    # or starts fresh if there is none.
    try:
        resume_from, resume_meta, warnings = resolve_resume(Path(cfg.run_dir), cfg.resume.path)
    except CheckpointError as err:
        print0(f"checkpoint error: {err}", file=sys.stderr)
        shutdown()
        return 2
    for warning in warnings:
        print0(f"resume: {warning}", file=sys.stderr)

    # 3. Data: records -> token ids (prompt masked in the labels), general text mixed in, packed ->
    #    this rank's micro-batches. Tokenized once by rank 0 and cached; the others wait and read.
    from transformers import AutoTokenizer

    model_folder = resolve_model_folder(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    geometry = BatchGeometry(
        cfg.batch.micro_batch_size,
        grad_accum_steps(cfg, d.world_size),
        d.world_size,
        cfg.batch.max_seq_length,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        data = prepare_data(
            cfg.data,
            tokenizer,
            cfg.batch.max_seq_length,
            cfg.seed,
            d.is_main,
            dist.barrier,
            max_eval_examples=cfg.eval.max_examples,
        )
        loader = DistributedBatchLoader(data.train, geometry, d.rank, cfg.seed, pad_id)
    except (ValueError, FileNotFoundError) as err:
        # Bad data is found here, before any model exists or the run folder is written; rank 0 reads
        # the data first, and torchrun stops the other ranks when it exits.
        print(f"data error: {err}", file=sys.stderr, flush=True)
        return 2
    efficiency, targets_per_step = loader.epoch_statistics()
    # Held-out sets, each split over the ranks (the same number of forwards on each), and the
    # prompts answered before and after training.
    eval_examples = {n: e for n, e in data.eval_sets.items() if cfg.eval.sets is None or n in cfg.eval.sets}
    eval_data = {
        name: eval_batches(
            examples, d.rank, d.world_size, cfg.eval.micro_batch_size or geometry.micro_batch_size, pad_id
        )
        for name, examples in eval_examples.items()
    }
    prompts = [("domain", p) for p in cfg.data.prompts] + [("general", p) for p in cfg.data.general.prompts]
    total_steps = loader.steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # 4. Model: meta-device build, activation checkpointing, one FSDP unit per decoder layer, then
    #    each rank allocates and reads only its own rows. Peak host memory is measured around it.
    memory.reset_peak_rss()
    load_start = time.perf_counter()
    hf_config = load_hf_config(model_folder, dict(cfg.model.config_overrides))
    model = build_sharded_model(
        hf_config,
        d,
        precision=cfg.precision,
        checkpointing=cfg.activation_checkpointing.mode,
        every_k=cfg.activation_checkpointing.every_k,
        reshard_after_forward=cfg.fsdp.reshard_after_forward,
        cpu_offload=cfg.fsdp.cpu_offload,
        chunk_tokens=cfg.loss.chunk_tokens,
        pretrained=None if cfg.model.random_init else model_folder,
        seed=cfg.seed,
        load_weights=resume_from is None,
    )
    load_seconds = time.perf_counter() - load_start
    load_peaks = [None] * d.world_size
    dist.all_gather_object(load_peaks, memory.peak_rss_bytes())

    # 5. Optimizer and schedule. AdamW's moments take the dtype and sharding of each parameter.
    optimizer = AdamW(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    optimizer.init_state()  # m and v now, not at step 1: every step, the first included, holds them
    start_step = 0
    if resume_from is not None:
        # Model and AdamW state (DCP reshards them to this world size), RNG, data position, step.
        load_start = time.perf_counter()
        try:
            load_checkpoint(resume_from, model, optimizer)
        except CheckpointError as err:
            print0(f"checkpoint error: {err}", file=sys.stderr)
            shutdown()
            return 2
        loader.load_state_dict(resume_meta["loader"])
        start_step = resume_meta["step"]
        print0(
            f"resumed from {resume_from} (step {start_step}, saved by {resume_meta['world_size']} ranks) "
            f"in {time.perf_counter() - load_start:.1f} s"
        )
    warmup = warmup_steps(total_steps, cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio)
    schedule = LRSchedule(cfg.optim.lr, total_steps, warmup, cfg.schedule.decay, cfg.schedule.min_lr_ratio)

    n_params = count_parameters(model)
    data_lines = [
        f"data       {cfg.data.path} ({cfg.data.format}), prepared in {data.seconds:.1f} s"
        + (" from the cache" if data.cached else ""),
        *(f"    {line}" for line in data.lines),
        f"    batches: {efficiency:.1%} of positions are tokens (the rest padding); "
        f"{targets_per_step:,.0f} target tokens per optimizer step on average",
        f"loading    {load_seconds:.1f} s; peak host memory per rank: "
        + ", ".join(memory.gib(p) for p in load_peaks),
        "eval       "
        + (
            ", ".join(f"{name} {len(examples):,} examples" for name, examples in eval_examples.items())
            + " held out; before step 1, after the last"
            + (f" and every {cfg.eval.every_steps} steps" if cfg.eval.every_steps else "")
            if eval_examples
            else "no held-out set (data.eval_path, data.eval_fraction or data.general.eval_path)"
        )
        + (
            f"; {len(prompts)} prompts answered before and after"
            if cfg.eval.max_new_tokens and prompts
            else ""
        ),
    ]
    # The analytic model's bytes per rank of one step (fsdp/memory.py), for full-length micro-batches.
    shape = memory.ModelShape.from_hf_config(hf_config)  # a meta-device build: every parameter's shape
    predicted = memory.predict(
        shape,
        memory.Workload.from_config(cfg, d.world_size, geometry.grad_accum_steps, d.device.type),
    )
    largest = sorted(predicted["categories"].items(), key=lambda kv: -kv[1])[:3]
    data_lines.append(
        f"memory     analytic peak {memory.gib(predicted['peak'])} per rank ({predicted['peak_phase']}), "
        + ", ".join(f"{k} {memory.gib(v)}" for k, v in largest)
        + ("; memory.track=true measures it" if not cfg.memory.track else "")
    )
    # Throughput: model FLOPs per token (fsdp/flops.py) and the device's peak, for MFU.
    throughput = Throughput(shape, hf_config, cfg, d)
    data_lines.append(throughput.describe(cfg.batch.max_seq_length))
    print0(banner(cfg, d, hf_config, n_params, geometry, schedule, data_lines))

    # 6. The loop. Only now, with data and model ready, is the run folder written (rank 0).
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = MetricsLogger(run_dir, d.is_main, total_steps, start_step)
    checkpoint_meta = {
        "fingerprint": resume_fingerprint(cfg, d.world_size),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }

    # Evaluation: the held-out loss of each set, logged as eval/<set>/loss; its history (and the
    # answers before training) go into every checkpoint, so a resumed run's "before" is still the
    # model before fine-tuning.
    eval_history: list[dict] = []
    eval_tokens: dict[str, int] = {}
    eval_seconds = 0.0
    stop_ids = stop_token_ids(tokenizer, getattr(model.causal_lm, "generation_config", None))

    def run_eval(step: int) -> None:
        nonlocal eval_seconds
        results = {name: evaluate.evaluate(model, batches, d.device) for name, batches in eval_data.items()}
        if results:
            eval_seconds += sum(r.seconds for r in results.values())
            metrics.log_extra(step, evaluate.scalars(results))
            metrics.write(evaluate.describe(step, results))
            eval_history.append({"step": step, **{name: r.loss for name, r in results.items()}})
            eval_tokens.update({name: r.target_tokens for name, r in results.items()})

    def answer() -> list[str]:
        """Greedy answers to every prompt, from the sharded model on all ranks (fsdp/generate.py)."""
        nonlocal eval_seconds
        start = time.perf_counter()
        ids = [prompt_ids(tokenizer, prompt) for _, prompt in prompts]
        new = greedy_generate(model, ids, cfg.eval.max_new_tokens, stop_ids, pad_id, d.device)
        eval_seconds += time.perf_counter() - start
        metrics.write(f"answered {len(ids)} prompts in {time.perf_counter() - start:.1f} s")
        return [tokenizer.decode(a, skip_special_tokens=True) for a in new]

    def save(step: int) -> None:
        """A sharded checkpoint after `step` optimizer steps; its cost goes to the logs."""
        eval_state = {"history": eval_history, "target_tokens": eval_tokens, "answers_before": answers_before}
        report = save_checkpoint(
            run_dir,
            step,
            model,
            optimizer,
            {**checkpoint_meta, "loader": loader.state_dict(), "eval": eval_state},
            d.is_main,
            cfg.checkpoint.keep_last,
            lambda folder: save_hf_files(
                folder, model.causal_lm.config, tokenizer, getattr(model.causal_lm, "generation_config", None)
            ),
        )
        metrics.log_extra(step, {"checkpoint/save_s": report["seconds"], "checkpoint/bytes": report["bytes"]})
        metrics.write(
            f"checkpoint {report['path']}: {report['bytes'] / 2**20:,.1f} MiB in {report['seconds']:.1f} s"
        )

    saved = (resume_meta or {}).get("eval") or {"history": [], "target_tokens": {}, "answers_before": []}
    if set(saved["target_tokens"]) == set(eval_data) and saved["history"]:
        eval_history += saved["history"]
        eval_tokens.update(saved["target_tokens"])
    else:
        if start_step:
            print0(f"eval: the checkpoint has no evaluation of these sets; 'before' is step {start_step}")
        run_eval(start_step)
    answers_before = saved["answers_before"]
    if len(answers_before) != len(prompts) or not cfg.eval.max_new_tokens:
        answers_before = answer() if cfg.eval.max_new_tokens else []

    # With comm.track, what each step's collectives should move (fsdp/comm.py), from the shard layout.
    comm_theory = (
        comm_theory_of(
            describe_units(model, d.world_size, cfg.precision),
            d.world_size,
            geometry.grad_accum_steps,
            cfg.precision,
            cfg.fsdp.reduce_grads_every_microbatch,
        )
        if cfg.comm.track
        else {}
    )

    memory.reset_peak_rss()
    # With memory.track, the first and the last step run under the ledger (it slows them down).
    tracked_steps = sorted({0, total_steps - 1}) if cfg.memory.track else []
    ledgers: dict[str, dict] = {}
    model.train()
    losses = metrics.previous_losses
    run_start, eval_seconds_before = time.perf_counter(), eval_seconds
    for step in range(start_step, total_steps):
        faults.begin_step(step + 1)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        wait_start = time.perf_counter()
        micro_batches = [b.to(d.device) for b in loader.next_step()]
        position = loader.state_dict()  # after this step's batches: epoch, batches taken in it
        step_start = time.perf_counter()
        data_wait = step_start - wait_start
        comm_tracker = comm.CommTracker(model, d.world_size) if cfg.comm.track else nullcontext()
        tracker = memory.StepMemory(
            model,
            optimizer,
            hf_config.vocab_size,
            d,
            micro_batches,
            track=step in tracked_steps,
            snapshot=run_dir / f"memory_snapshot_rank{d.rank}.pickle"
            if cfg.memory.snapshot and step == 0
            else None,
        )
        with tracker, comm_tracker:
            stats = train_step(
                model,
                optimizer,
                micro_batches,
                cfg.optim.max_grad_norm,
                cfg.fsdp.reduce_grads_every_microbatch,
            )
        seconds = time.perf_counter() - step_start
        if not stats.finite:
            # The update was not applied (train_step); the model is still the last good one.
            where = (
                f"step {step + 1}: loss {stats.loss}, gradient norm {stats.grad_norm}, on the data of epoch "
                f"{position['epoch'] + 1}, batch {position['step_in_epoch']} of {loader.steps_per_epoch}"
            )
            latest = complete_checkpoints(run_dir)
            last_good = str(latest[-1]) if latest else "none yet"
            if cfg.train.on_nonfinite == "stop":
                print0(
                    f"non-finite {where}; stopped before the optimizer step. Last good checkpoint: {last_good}. "
                    "Resume with resume=auto, or pass over such steps with train.on_nonfinite=skip",
                    file=sys.stderr,
                )
                metrics.close()
                shutdown()
                return 3
            metrics.write(f"skipped non-finite {where} (train.on_nonfinite=skip)")
        losses.append(stats.loss)
        scalars = {
            "train/loss": stats.loss,
            "train/lr": lr,
            "train/grad_norm": stats.grad_norm,
            "train/tokens_per_s": stats.tokens / seconds,
            "train/target_tokens": stats.target_tokens,
            "train/skipped": float(not stats.finite),
            **throughput.scalars(micro_batches, seconds),
            "time/step_s": seconds,
            "time/data_wait_s": data_wait,
            **{f"time/{phase}_s": t for phase, t in stats.seconds.items()},
            **tracker.scalars(),
        }
        if cfg.comm.track:
            scalars.update(comm.step_scalars(comm_tracker.ledger))
            metrics.write(comm.step_line(step + 1, comm_tracker.ledger, comm_theory))
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps or tracker.ledger:
            metrics.log(step + 1, scalars)
        if tracker.ledger:
            ledgers[f"step {step + 1}"] = tracker.result()
            report_memory(cfg, d, metrics, predicted, ledgers, run_dir)
        if cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 and step + 1 < total_steps:
            run_eval(step + 1)
        every = cfg.checkpoint.every_steps
        if (every and (step + 1) % every == 0) or (step + 1 == total_steps and cfg.checkpoint.at_end):
            save(step + 1)
    train_seconds = time.perf_counter() - run_start - (eval_seconds - eval_seconds_before)
    train_peaks = [None] * d.world_size
    dist.all_gather_object(train_peaks, memory.peak_rss_bytes())

    # 7. Forgetting: the held-out loss and the answers after training, beside those before.
    if not eval_history or eval_history[-1]["step"] != total_steps:
        run_eval(total_steps)
    answers_after = answer() if cfg.eval.max_new_tokens else []
    metrics.close()
    if d.is_main and eval_history:
        report = evaluate.forgetting_report(
            eval_history, {name: len(e) for name, e in eval_examples.items()}, eval_tokens
        )
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        print0(evaluate.format_forgetting(report))
    if d.is_main and answers_after:
        rows = [
            {"set": name, "prompt": prompt, "before": before, "after": after}
            for (name, prompt), before, after in zip(prompts, answers_before, answers_after, strict=True)
        ]
        (run_dir / "generations.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
        before_step = eval_history[0]["step"] if eval_history else 0
        (run_dir / "generations.md").write_text(
            side_by_side(rows, before_step, total_steps, cfg.eval.max_new_tokens)
        )
        print0(f"answers before and after: {run_dir / 'generations.md'}")

    # 8. Export: gathered tensor by tensor, written by rank 0.
    export_dir = run_dir / "model"
    if cfg.export.enabled:
        export_hf(
            model.causal_lm,
            export_dir,
            tokenizer,
            cfg.export.dtype,
            cfg.export.max_shard_mb * 2**20,
            d.is_main,
        )
    if d.is_main:
        summary = {
            "steps": total_steps,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "peak_rss_bytes_per_rank": train_peaks,
            "load_peak_rss_bytes_per_rank": load_peaks,
            "export": str(export_dir) if cfg.export.enabled else None,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print0(
            f"done: {total_steps} steps in {train_seconds:.1f} s, loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}; peak host memory per rank during training: "
            + ", ".join(memory.gib(p) for p in train_peaks)
        )
        if cfg.export.enabled:
            print0(
                f"model written to {export_dir}; load it with "
                f"AutoModelForCausalLM.from_pretrained({str(export_dir)!r}) and "
                f"AutoTokenizer.from_pretrained({str(export_dir)!r})"
            )
    shutdown()
    return 0


class Throughput:
    """Tokens/s and FLOP/s per rank for a step, and MFU where the device's peak is known."""

    def __init__(self, shape: memory.ModelShape, hf_config, cfg, d: Dist):
        self.flops = FlopsModel.from_shape(shape)
        ac = cfg.activation_checkpointing
        self.recomputed = len(checkpointed_layers(hf_config.num_hidden_layers, ac.mode, ac.every_k))
        name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
        self.peak_tflops = device_peak_tflops(name, cfg.metrics.peak_tflops)

    def describe(self, seq_len: int) -> str:
        model = self.flops.model_flops_per_token(seq_len)
        hardware = self.flops.hardware_flops_per_token(seq_len, self.recomputed)
        peak = (
            f"MFU against {self.peak_tflops:g} TFLOP/s per rank"
            if self.peak_tflops
            else "no MFU (no known peak: metrics.peak_tflops=...)"
        )
        return (
            f"compute    {model / 1e9:.2f} GFLOP per token at {seq_len} tokens (6 x {self.flops.matmul_params:,} "
            f"+ attention), {hardware / model:.2f}x that with recomputation; {peak}"
        )

    def scalars(self, micro_batches: list[Batch], seconds: float) -> dict[str, float]:
        """This rank's: attention's cost uses each micro-batch's padded length."""
        tokens = sum(b.num_tokens for b in micro_batches)
        model_flops = sum(
            b.num_tokens * self.flops.model_flops_per_token(b.input_ids.shape[1]) for b in micro_batches
        )
        hardware_flops = sum(
            b.num_tokens * self.flops.hardware_flops_per_token(b.input_ids.shape[1], self.recomputed)
            for b in micro_batches
        )
        out = {
            "perf/tokens_per_s_per_rank": tokens / seconds,
            "perf/model_tflops_per_rank": model_flops / seconds / 1e12,
            "perf/hardware_tflops_per_rank": hardware_flops / seconds / 1e12,
        }
        if self.peak_tflops:
            out["perf/mfu"] = out["perf/model_tflops_per_rank"] / self.peak_tflops
        return out


def comm_theory_of(
    units: list, world_size: int, micro_batches: int, precision: str, reduce_every: bool
) -> dict:
    """fsdp/comm.py's theory for a step, from the shard layout (fsdp/shard.py's describe_units)."""
    return comm.expected(
        {u.name: (u.padded_numel, u.reshard_after_forward) for u in units},
        world_size,
        micro_batches,
        memory.COMPUTE_BYTES[precision],
        memory.REDUCE_BYTES[precision],
        reduce_every,
    )


def report_memory(
    cfg, d: Dist, metrics: MetricsLogger, predicted: dict, ledgers: dict, run_dir: Path
) -> None:
    """Each rank's ledger so far beside the prediction: printed (rank 0, or all), and memory.json."""
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, ledgers)
    for rank, rank_ledgers in enumerate(everyone):
        if rank == d.rank and (d.is_main or cfg.memory.all_ranks):
            text = memory.report(predicted, rank_ledgers, f"memory of rank {rank} (GiB)")
            if cfg.memory.all_ranks and not d.is_main:
                print(text, flush=True)
            else:
                metrics.write(text)
    if d.is_main:
        record = {"analytic": predicted, "ranks": everyone}
        (run_dir / "memory.json").write_text(json.dumps(record, indent=1))


def synthetic_batch(micro_batch_size: int, seq_len: int) -> Batch:
    """Full-length sequences, every position a target: the shapes of a real batch, the memory of the worst.

    Positions are left to the model (0 .. seq_len - 1, as in unpacked data): given positions, HF
    checks their values for restarts (packed sequences), which fake tensors do not have, and would
    then build the attention mask that packed sequences need.
    """
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
    tokens = micro_batch_size * seq_len
    return Batch(ids, ids.clone(), None, tokens, tokens)


def build_workload_model(hf_config, d: Dist, w: memory.Workload) -> TrainableCausalLM:
    """build_sharded_model with a Workload's settings, from random init: estimates and explanations."""
    return build_sharded_model(
        hf_config,
        d,
        precision=w.precision,
        checkpointing=w.checkpointing,
        every_k=w.every_k,
        reshard_after_forward=w.reshard_after_forward,
        chunk_tokens=w.chunk_tokens,
    )


def measure_step(
    hf_config, d: Dist, w: memory.Workload, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0
) -> dict:
    """The ledger of one steady-state training step of `w` on synthetic full-length batches."""
    model = build_workload_model(hf_config, d, w)
    optimizer = AdamW(param_groups(model, weight_decay), lr=1e-5)
    optimizer.init_state()  # steady state: m and v exist before the step, as from step 2 on
    micro_batches = min(w.grad_accum_steps, 2)  # a second micro-batch shows what accumulation keeps
    batches = [synthetic_batch(w.micro_batch_size, w.seq_len).to(d.device) for _ in range(micro_batches)]
    ledger = memory.MemoryLedger(model, optimizer, hf_config.vocab_size, d.device)
    for b in batches:
        ledger.track_inputs((b.input_ids, b.labels))
    with ledger:
        train_step(model, optimizer, batches, max_grad_norm, w.reduce_grads_every_microbatch)
    return ledger.result()


def measure_step_on_fake_tensors(hf_config, w: memory.Workload, max_grad_norm: float | None = 1.0) -> dict:
    """measure_step for rank 0 of w.world_size ranks that do not exist, every tensor fake (no memory)."""
    with memory.fake_process_group(w.world_size) as d, memory.fake_tensors():
        return measure_step(hf_config, d, w, max_grad_norm=max_grad_norm)


def estimate_memory(cfg) -> int:
    """No training: what one step of this run needs on each of memory.world_size ranks, and what fits."""
    from fsdp.config import model_config_source

    hf_config = load_hf_config(model_config_source(cfg), dict(cfg.model.config_overrides))
    w = memory.Workload.from_config(cfg, cfg.memory.world_size, grad_accum_steps(cfg, cfg.memory.world_size))
    shape = memory.ModelShape.from_hf_config(hf_config)
    predicted = memory.predict(shape, w)
    start = time.perf_counter()
    fake = measure_step_on_fake_tensors(hf_config, w, cfg.optim.max_grad_norm)
    print(
        memory.estimate_report(
            cfg.model.name_or_path, shape, w, predicted, fake, time.perf_counter() - start, cfg.memory.fit_gib
        ),
        flush=True,
    )
    return 0


def explain_sharding(cfg) -> int:
    """No training: how this model is sharded over memory.world_size ranks, and what one step sends.

    The real build, sharding and train_step, on fake tensors and a fake process group (as the
    memory estimate), so Llama-3-8B at 8 ranks runs on a laptop: the shard layout of every unit,
    then the order of collectives and compute in one step, and their bytes beside the theory.
    """
    from fsdp.config import model_config_source
    from fsdp.shard import format_units

    hf_config = load_hf_config(model_config_source(cfg), dict(cfg.model.config_overrides))
    n = cfg.memory.world_size
    w = memory.Workload.from_config(cfg, n, grad_accum_steps(cfg, n))
    micro_batches = min(w.grad_accum_steps, 2)  # a second micro-batch shows what accumulation repeats
    with memory.fake_process_group(n) as d, memory.fake_tensors():
        model = build_workload_model(hf_config, d, w)
        units = describe_units(model, n, w.precision)
        optimizer = AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
        batches = [synthetic_batch(w.micro_batch_size, w.seq_len) for _ in range(micro_batches)]
        with comm.CommTracker(model, n) as counter:
            train_step(model, optimizer, batches, cfg.optim.max_grad_norm, w.reduce_grads_every_microbatch)
    theory = comm_theory_of(units, n, micro_batches, w.precision, w.reduce_grads_every_microbatch)
    print(
        "\n\n".join(
            [
                f"{cfg.model.name_or_path} ({type(hf_config).__name__.removesuffix('Config')}), {n} ranks, "
                f"{w.precision}, micro-batch {w.micro_batch_size} x {w.seq_len}, activation checkpointing "
                f"{w.checkpointing}",
                format_units(units, n, w.precision),
                f"one optimizer step of {micro_batches} micro-batches, rank 0, in order:\n"
                + comm.format_order(counter.ledger, [u.name for u in units]),
                comm.format_totals(counter.ledger, theory),
            ]
        ),
        flush=True,
    )
    return 0


def banner(cfg, d, hf_config, n_params: int, geometry, schedule: LRSchedule, data_lines: list[str]) -> str:
    """The startup report: what is trained, where, in which precision, on how much data, per rank."""
    per_param = memory.BYTES_PER_PARAM[cfg.precision]
    state_lines = [
        f"    {name:<16} {b:>2} bytes/param -> {memory.gib(b * n_params / d.world_size)} per rank"
        for name, b in per_param.items()
    ]
    total = sum(per_param.values())
    compute = "bf16" if cfg.precision in ("mixed", "bf16") else "fp32"
    layers = hf_config.num_hidden_layers
    ac = cfg.activation_checkpointing
    lines = [
        "=" * 78,
        f"fulltune  preset={cfg.name}  run_dir={cfg.run_dir}",
        f"model      {cfg.model.name_or_path} ({type(hf_config).__name__.removesuffix('Config')}, "
        f"{n_params:,} params, {layers} layers{', random init' if cfg.model.random_init else ''})",
        f"ranks      {d.world_size} x {d.device.type} ({d.backend}), {torch.get_num_threads()} threads each",
        f"precision  {cfg.precision}: compute {compute}; model state {total} bytes/param / {d.world_size} ranks",
        *state_lines,
        f"checkpoint activations: {ac.mode}"
        + (f" (every {ac.every_k})" if ac.mode == "every_k" else "")
        + f"; FSDP: {layers} layer units + root, reshard_after_forward={cfg.fsdp.reshard_after_forward}",
        f"batch      {geometry.describe()}",
        f"schedule   {schedule.total_steps} steps, lr {cfg.optim.lr:g}, warmup {schedule.warmup_steps}, "
        f"{cfg.schedule.decay} "
        f"to {cfg.schedule.min_lr_ratio:g} x lr, clip {cfg.optim.max_grad_norm}",
        *data_lines,
        "=" * 78,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
