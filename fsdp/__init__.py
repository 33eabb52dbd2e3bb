"""The machinery of sharded full fine-tuning, one concept a module. Read in this order:

    dist.py        process group, device and the device mesh (1-D: every rank holds a shard; 2-D
                   for HSDP: replicas across nodes, shards within one), timeouts; a rank exits the
                   moment its launcher dies
    precision.py   THE precision table: storage, compute and reduce dtypes, bytes per parameter,
                   FSDP's MixedPrecisionPolicy, and what `auto` picks on this hardware
    model.py       a Hugging Face causal LM on the meta device, its decoder layers, per-rank loading
    activation.py  activation checkpointing: which layers keep only their input (none|every_k|full),
                   or also their matmuls' and attention's outputs (selective)
    offload.py     activation offloading: what each layer saves for backward waits in host memory
    shard.py       fully_shard per decoder layer and the root (or torchtitan's split root); prefetch
    layout.py      the shard layout of every unit, read off the sharded model (make explain)
    build.py       wrap -> activation checkpointing -> [compile] -> [offload] -> shard -> load, in that order
    loss.py        token-weighted cross-entropy, the vocabulary logits one slice at a time
    adamw.py       AdamW written out, on each rank's local shards; its foreach and fused versions
    schedule.py    the learning rate of each optimizer step (warmup, decay)
    step.py        one optimizer step: accumulate micro-batches, reduce once, clip, AdamW; its timing
    flops.py       FLOPs per token, FLOP/s and MFU
    comm.py        every collective's bytes, per kind and FSDP unit, beside the theory
    memory/        every byte per rank: the analytic model, the measured ledger, the estimate, reports
    fake.py        a fake process group and fake tensors: rank 0 of N GPUs on a laptop
    instruments.py what each training step is measured by (time, memory, collectives), logged
    metrics.py     the progress bar, TensorBoard and metrics.jsonl (rank 0)
    evaluate.py    held-out loss on all ranks; the Evaluator (own-answers drift, the cached 'before')
                   and the forgetting report
    generate.py    greedy answers from the sharded model, before and after training
    checkpoint.py  sharded DCP checkpoints, verified and resumable; the Checkpointer
    rundir.py      the run folder: one live run at a time (rank 0's lock), a finished run stays finished
    export.py      a Hugging Face folder, from the live model or from a checkpoint
    stop.py        how a run stops: one line, one exit status, the process group closed in order
    faults.py      faults on purpose (kills, NaN), for the tests of checkpointing and resume

Where a change goes:
- a new parallelism (tensor parallel, say; HSDP shows the way): the mesh in dist.py, the placement in shard.py,
  the build order in build.py; then what it changes in memory/analytic.py and comm.py's theory.
- torch.compile: build.py, between activation checkpointing and sharding (compile_layers).
- a new speed lever: a field of BuildSettings (build.py) or ShardSettings (shard.py), its field in
  config/schema.py and value in conf/config.yaml, and its row in bench/levers.py.
- a new memory category: the vocabulary in memory/vocabulary.py, its formula in memory/analytic.py,
  its label in memory/ledger.py; the tests compare the three.
- a new precision mode: one row of precision.py.
- a new file a run writes: through durable/ (write_atomic for a whole file, publish_folder for a
  folder, AppendLog for a log that grows); tests/test_durable.py finds any other write.
- a new architecture's quirks: model.py (decoder-layer discovery, logits transforms, buffers).
- a new data format: data/, not here; fsdp/ and data/ share only the batch package (Batch, BatchGeometry, IGNORE_INDEX).

Nothing here reads the Hydra config or imports data/: each mechanism takes plain arguments or a
small settings dataclass, which config/settings.py builds from the config.
"""
