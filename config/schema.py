"""What each config key is: its type, and what it means in the docstring under it.

These dataclasses are the base of Hydra's composition (register_schema; conf/config.yaml names it
first in its defaults list), so every file and override is merged into typed nodes: an unknown key or
a value of the wrong type is refused there, naming the key. The values themselves live in
conf/config.yaml and its groups; every field here is MISSING until they set it.

A key that takes one of a few words (precision, data.format, ...) is a `str`: the words are
config/validate.py's CHOICES, and the numbers' ranges its RANGES. (An Enum would reach the code, and
the yaml and json writers, as an Enum member rather than the string the code compares with.)
"""

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

SCHEMA_NAME = "schema"  # the name conf/config.yaml's defaults list gives it


@dataclass
class Resume:
    path: str | None = MISSING
    """null: a fresh start; auto: the latest complete checkpoint in run_dir (or a fresh start if
    there is none); or a checkpoint folder. `resume=auto` on the command line sets it."""

    allow_config_change: bool = MISSING
    """Resume even if the data order or the batch geometry changed since the checkpoint."""


@dataclass
class Model:
    name_or_path: str = MISSING
    """A local Hugging Face model folder, or a hub name (downloaded at run time)."""

    config_file: str | None = MISSING
    """The model's config.json, read when name_or_path is not a local folder: shipped for the hub
    models, so memory estimates need no download and no access token. null: none."""

    random_init: bool = MISSING
    """Random weights of the model's architecture instead of its pretrained ones."""

    config_overrides: dict[str, Any] = MISSING
    """Keys of the model's own config.json to change (num_hidden_layers: 2, ...); Hugging Face checks them."""


@dataclass
class GeneralData:
    fraction: float = MISSING
    """Share of the training examples drawn from the general data, mixed in against catastrophic forgetting."""

    path: str | None = MISSING
    """The general training records (needed when fraction > 0)."""

    format: str = MISSING
    """How `path` is read: text (windows), prompt_response, or chat (self-replay: the model's own
    answers). eval_path is always text."""

    eval_path: str | None = MISSING
    """Held-out general text (the "general" eval set), evaluated even when nothing general is mixed in."""

    text_field: str = MISSING
    """The records' text field."""

    prompts: list[str] = MISSING
    """General questions, answered greedily before and after training beside data.prompts: what was forgotten."""


@dataclass
class UnseenData:
    eval_path: str | None = MISSING
    """General text of another kind, never trained on (the "unseen" eval set): forgetting where mixing
    cannot help."""

    text_field: str = MISSING
    """The records' text field."""


@dataclass
class Data:
    format: str = MISSING
    """How the records are read: prompt_response, chat, or text."""

    path: str = MISSING
    """A .jsonl, .json, .parquet or .txt file, or a hub dataset name (needs network)."""

    subset: str | None = MISSING
    """Hub datasets: the configuration name."""

    split: str = MISSING
    """Hub datasets: the split."""

    prompt_field: str = MISSING
    """prompt_response records: the prompt's field."""

    response_field: str = MISSING
    """prompt_response records: the response's field."""

    messages_field: str = MISSING
    """chat records: the field holding the list of {role, content} turns."""

    text_field: str = MISSING
    """text records: the text's field."""

    eval_path: str | None = MISSING
    """Held-out records in a file of their own (the "domain" eval set); or use eval_fraction."""

    eval_fraction: float = MISSING
    """A seeded share of the records of `path`, held out as the "domain" eval set."""

    too_long: str = MISSING
    """truncate or drop an example longer than batch.max_seq_length (prompt_response and chat; text
    is cut into windows)."""

    train_on_prompt: bool = MISSING
    """Prompts, system and user turns are targets too, not only the responses."""

    packing: bool = MISSING
    """Pack examples into max_seq_length sequences."""

    max_train_examples: int | None = MISSING
    """Train on a seeded subset of this many domain examples; null: all."""

    prompts: list[str] = MISSING
    """Questions of this task, answered greedily before and after training."""

    num_proc: int | None = MISSING
    """Processes that tokenize, once per node; null: its cores. The result is cached."""

    cache_dir: str = MISSING
    """Where tokenized data is cached."""

    general: GeneralData = field(default_factory=GeneralData)
    """General data mixed in against catastrophic forgetting."""

    unseen: UnseenData = field(default_factory=UnseenData)
    """General text that is only evaluated."""


@dataclass
class ActivationCheckpointing:
    mode: str = MISSING
    """none; selective (every layer: matmul and attention outputs kept, the rest recomputed);
    every_k; or full."""

    every_k: int = MISSING
    """With mode every_k: checkpoint layers 0, k, 2k, ..."""

    offload: bool = MISSING
    """What the layers save for backward waits in host memory (fsdp/offload.py); with full: their inputs."""


@dataclass
class Fsdp:
    reshard_after_forward: bool = MISSING
    """Free each layer's gathered parameters after forward (gathered again in backward)."""

    cpu_offload: bool = MISSING
    """Keep sharded parameters, gradients and optimizer state in host memory (cuda only)."""

    replicate: Any = MISSING
    """HSDP: auto, or R replicas of the model state, each sharded over world_size / R ranks (a 2-D
    mesh). auto: one replica per node when there are several (shard within a node, all-reduce
    across), else 1. (auto or a whole number: config/validate.py checks it.)"""

    reduce_grads_every_microbatch: bool = MISSING
    """false: reduce-scatter the gradients once per optimizer step."""

    reduce_dtype: str | None = MISSING
    """null: the precision's own (fp32 under mixed); fp32; or bf16 (half the bytes, less exact sums)."""

    split_root: bool = MISSING
    """torchtitan's units: embeddings alone; final norm and head kept gathered from forward to backward."""

    explicit_prefetch: int = MISSING
    """0: FSDP2's implicit prefetch; N: issue the all-gathers of the next N units explicitly."""


@dataclass
class Batch:
    micro_batch_size: int = MISSING
    """Sequences per rank per forward."""

    grad_accum_steps: int = MISSING
    """Micro-batches per optimizer step."""

    global_batch_size: int | None = MISSING
    """Sequences per optimizer step; if set, grad_accum_steps is derived from it."""

    max_seq_length: int = MISSING
    """Tokens per sequence, at most."""


@dataclass
class Optim:
    lr: float = MISSING
    """The peak learning rate (AdamW)."""

    betas: list[float] = MISSING
    """AdamW's two moment decays, [beta1, beta2]."""

    eps: float = MISSING
    """AdamW's epsilon."""

    weight_decay: float = MISSING
    """Decoupled weight decay (norms and biases never decay)."""

    decay_embeddings: bool = MISSING
    """Weight decay on the embeddings too."""

    max_grad_norm: float | None = MISSING
    """Clip the gradient norm to this; null or 0: no clipping (the norm is still logged)."""

    impl: str = MISSING
    """loop (one parameter at a time: the reference), foreach (multi-tensor) or fused (torch's)."""

    state_dtype: str | None = MISSING
    """null: the parameters' storage dtype (fp32 under mixed); fp32; or bf16 (m and v: 4 bytes/param less)."""


@dataclass
class Schedule:
    warmup_steps: int | None = MISSING
    """Linear warmup steps; null: warmup_ratio of the total steps."""

    warmup_ratio: float = MISSING
    """Warmup as a share of the total steps, when warmup_steps is null."""

    decay: str = MISSING
    """After warmup: cosine, linear or constant."""

    min_lr_ratio: float = MISSING
    """The floor the decay ends at, as a fraction of optim.lr."""


@dataclass
class Train:
    epochs: int = MISSING
    """Passes over the training data."""

    max_steps: int | None = MISSING
    """Stop after this many optimizer steps, earlier than the epochs would; null: no limit."""

    log_every: int = MISSING
    """Log the metrics every this many optimizer steps."""

    on_nonfinite: str = MISSING
    """A NaN or Inf loss or gradient norm: stop, or skip the step (the update is never applied)."""


@dataclass
class OwnAnswers:
    prompts: str | None = MISSING
    """A text file, one general question per line (data/samples/general-questions.txt); null: off.
    Before training, the model's greedy answers to them are kept (token ids); each evaluation then
    measures the loss on them (the "own_answers" set): drift from its own answers."""

    max_new_tokens: int = MISSING
    """Tokens per kept answer, at most."""


@dataclass
class Eval:
    """Held-out loss on each eval set ("domain": data.eval_path or data.eval_fraction; "general":
    data.general.eval_path, read even when nothing general is mixed in; "unseen":
    data.unseen.eval_path; "own_answers": eval.own_answers.prompts), before the first step, every
    `every_steps` and after the last; eval.json compares the first and the last (forgetting)."""

    every_steps: int | None = MISSING
    """Also evaluate every N optimizer steps; null: only before and after."""

    sets: list[str] | None = MISSING
    """null: every held-out set the data has (domain, general, unseen); or a list of set names that must exist."""

    max_examples: int | None = MISSING
    """Per set: a seeded subset of this many held-out examples; null: all."""

    micro_batch_size: int | None = MISSING
    """Sequences per rank per forward; null: batch.micro_batch_size (fits by construction)."""

    max_new_tokens: int = MISSING
    """Tokens of the greedy answers to data.prompts and data.general.prompts; 0: no generations."""

    cache_dir: str | None = MISSING
    """The pretrained model's step-0 losses and own answers, the same for every run of the same model,
    precision and eval data, kept under a key of all three (resumed runs use the checkpoint's);
    null: always evaluated anew."""

    own_answers: OwnAnswers = field(default_factory=OwnAnswers)
    """The "own_answers" set: the loss on the model's own answers from before training."""


@dataclass
class Checkpoint:
    every_steps: int | None = MISSING
    """A sharded DCP checkpoint every N optimizer steps (and at the end); null: only at the end."""

    at_end: bool = MISSING
    """A checkpoint at the end of training."""

    keep_last: int | None = MISSING
    """Older complete checkpoints are deleted; null: keep all."""


@dataclass
class Loss:
    chunk_tokens: int = MISSING
    """Tokens per slice of the vocabulary logits (bounds the fp32 logits in memory)."""


@dataclass
class Comm:
    track: bool = MISSING
    """Count every collective's bytes per kind and FSDP unit each step, beside the theory."""

    init_timeout_s: float = MISSING
    """A collective's limit during set-up (ranks wait while one tokenizes or downloads)."""

    train_timeout_s: float = MISSING
    """A collective's limit from the first step on: a rank that hangs is found sooner."""


@dataclass
class Metrics:
    peak_tflops: float | None = MISSING
    """The device's dense bf16 peak per rank, for MFU; null: the GPU table in fsdp/flops.py (none on CPU)."""


@dataclass
class Memory:
    track: bool = MISSING
    """Measure steps 1 and the last (FSDPMemTracker): tables, TensorBoard, memory.json."""

    all_ranks: bool = MISSING
    """Print every rank's table, not only rank 0's."""

    snapshot: bool = MISSING
    """cuda: write memory_snapshot.pickle of step 1 (drag into pytorch.org/memory_viz)."""

    world_size: int = MISSING
    """The ranks estimate.py and explain.py are for (fake tensors, no training)."""

    nodes: int = MISSING
    """... on this many nodes (fsdp.replicate=auto: HSDP across them)."""

    fit_gib: float | None = MISSING
    """estimate.py: the planner, the cheapest levers that fit this many GiB per GPU; null: no planning."""


@dataclass
class Export:
    enabled: bool = MISSING
    """Write a Hugging Face model folder (safetensors) at the end."""

    dtype: str = MISSING
    """The exported weights' dtype: bf16 or fp32."""

    max_shard_mb: float = MISSING
    """safetensors files above this many MB are split, with an index."""


@dataclass
class RunConfig:
    """Every key a run reads."""

    name: str = MISSING
    """The run's name; run_dir defaults to runs/<name>."""

    run_dir: str = MISSING
    """The run folder. Every rank must agree on it, so it comes from the config, never from the clock."""

    overwrite: bool = MISSING
    """Write into a run_dir that already holds a run."""

    resume: Resume = field(default_factory=Resume)
    """Continue from a checkpoint."""

    seed: int = MISSING
    """Seeds random initialization, the held-out split and subsets, the mixing and the data order."""

    model: Model = field(default_factory=Model)
    """The model to fine-tune (a file of the model group: model=...)."""

    data: Data = field(default_factory=Data)
    """The training and held-out data (a file of the data group sets the keys its source needs)."""

    device: str = MISSING
    """auto, cpu or cuda (auto: cuda when a GPU is visible)."""

    backend: str = MISSING
    """auto, gloo or nccl (auto: nccl on cuda, gloo on cpu; offloading, nccl adds gloo for the host)."""

    precision: str = MISSING
    """mixed: fp32 master weights, gradients and AdamW state, bf16 compute (16 bytes/param).
    bf16: everything bf16 (8 bytes/param). fp32: everything fp32 (16 bytes/param).
    auto: mixed where bf16 is native (GPUs; CPUs with AVX-512 BF16 or AMX), fp32 elsewhere (an
    AVX2-only CPU emulates bf16 about 50x slower); the banner says which and why."""

    compile: bool = MISSING
    """torch.compile each decoder layer (inductor; on CPU it needs a C++ compiler)."""

    activation_checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    """Recompute activations in backward instead of keeping them."""

    fsdp: Fsdp = field(default_factory=Fsdp)
    """How FSDP2 shards, gathers and reduces."""

    batch: Batch = field(default_factory=Batch)
    """The batch geometry."""

    optim: Optim = field(default_factory=Optim)
    """AdamW."""

    schedule: Schedule = field(default_factory=Schedule)
    """The learning-rate schedule: warmup, then decay."""

    train: Train = field(default_factory=Train)
    """How long to train, and what to do with a non-finite step."""

    eval: Eval = field(default_factory=Eval)
    """Held-out evaluation and generations."""

    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    """Sharded checkpoints."""

    loss: Loss = field(default_factory=Loss)
    """The cross-entropy loss."""

    comm: Comm = field(default_factory=Comm)
    """Collectives: tracking and timeouts."""

    metrics: Metrics = field(default_factory=Metrics)
    """Throughput metrics."""

    memory: Memory = field(default_factory=Memory)
    """Memory tracking, and the world estimate.py and explain.py study."""

    export: Export = field(default_factory=Export)
    """The Hugging Face model folder written at the end."""


@functools.cache  # once per process: storing converts the dataclasses to a config, ~20 ms
@functools.cache
def register_schema() -> None:
    """Put RunConfig in Hydra's ConfigStore, where conf/config.yaml's defaults list finds it: once
    per process (the store is the process's own, and building the node costs about 20 ms)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


@functools.cache
def field_types() -> dict[str, Any]:
    """Every leaf key, dotted, with its declared type (`int | None`, `list[str]`, ...)."""
    return dict(_leaf_types(RunConfig, ""))


def _leaf_types(schema: type, prefix: str) -> typing.Iterator[tuple[str, Any]]:
    for entry in dataclasses.fields(schema):
        dotted = f"{prefix}{entry.name}"
        if dataclasses.is_dataclass(entry.type):
            yield from _leaf_types(entry.type, f"{dotted}.")
        else:
            yield dotted, entry.type


def declared_type(key: str) -> Any:
    """The type declared at a dotted key: a leaf (`optim.lr`), a group (`optim`), a list's item
    (`optim.betas[1]`) or a mapping's entry (`model.config_overrides.hidden_size`: Any); None where
    the schema has no such key."""
    annotation: Any = RunConfig
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        container = _without_none(annotation)
        is_index = part.startswith("[") or part.isdigit()  # optim.betas[1], or Hydra's optim.betas.1
        if dataclasses.is_dataclass(container) and not is_index:
            annotation = {entry.name: entry.type for entry in dataclasses.fields(container)}.get(part)
        elif typing.get_origin(container) is list and is_index:
            (annotation,) = typing.get_args(container)
        elif typing.get_origin(container) is dict and not part.startswith("["):
            annotation = typing.get_args(container)[1]
        else:
            return None
        if annotation is None:
            return None
    return annotation


def _without_none(annotation: Any) -> Any:
    """`int` of `int | None`; any other type as it is."""
    if isinstance(annotation, types.UnionType):
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def expected_type(key: str) -> str:
    """What the schema takes at a key, as a refusal says it: "must be a whole number, or null"."""
    annotation = declared_type(key)
    nullable = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        wanted = "a list of " + {int: "whole numbers", float: "numbers", str: "strings"}.get(item, "values")
    elif typing.get_origin(annotation) is dict:
        wanted = "a mapping of keys to values ({key: value, ...}), or {}"
    elif dataclasses.is_dataclass(annotation):
        wanted = f"a group of keys (such as {key}.{dataclasses.fields(annotation)[0].name}), not one value"
    else:
        wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
            annotation, "a value"
        )
    return f"must be {wanted}, or null" if nullable else f"must be {wanted}"
