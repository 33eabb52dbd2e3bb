"""Records -> token batches: everything between a data file and a rank's micro-batches.

    sources.py   raw records through `datasets`: JSON Lines, JSON, Parquet, text files, hub datasets;
                 questions files (one a line)
    sft.py       records -> token ids and labels, the loss only where the model should learn
                 (prompt/response, chat turns, plain text; a question and the model's own answer)
    packing.py   short examples packed into full-length sequences
    mixing.py    general data (text, or instructions: self-replay) mixed into the domain data, against
                 forgetting
    dataset.py   the whole pipeline as the `data` config says, tokenized once and cached
    loader.py    deterministic distributed batches: each rank its slice of the same global batch;
                 the held-out sets split so every rank runs the same number of forwards
    tasks.py     the shipped tasks, built offline from data that PyPI packages carry, and the unseen
                 set from the standard library (make data)

Where a change goes:
- a new file format: sources.py (a reader) and, if its records are new, sft.py (an encoder).
- a new way to build sequences (packing with attention boundaries, curriculum): packing.py or
  loader.py; the contract with the training side is the batch package's Batch and BatchGeometry.
- a new shipped task: tasks.py, then a conf/data/*.yaml that points at it.

Nothing here imports fsdp/ or the config package: dataset.py reads the `data` part of the config
it is handed, and what leaves this package is a list of examples and the batch package's Batches.
"""
