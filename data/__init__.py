"""Records -> token batches: everything between a data file and a rank's micro-batches.

    sources.py   raw records through `datasets`: JSON Lines, JSON, Parquet, text files, hub datasets;
                 read in batches by index; questions files (one a line)
    sft.py       records -> token ids and targets, the loss only where the model should learn
                 (prompt/response, chat turns, plain text; a question and the model's own answer),
                 a batch of records at a time, the text of the whole batch in one tokenizer call
    chat.py      a conversation's assistant turns found in one rendering of it (linear in the turns)
    tokens.py    the examples as flat arrays (token ids, target flags, offsets), on disk and
                 memory-mapped; the training set as index arrays into them
    packing.py   short examples packed into full-length sequences (on their lengths)
    mixing.py    general data (text, or instructions: self-replay) mixed in against forgetting
    dataset.py   the whole pipeline as the `data` config says: tokenized once per node in num_proc
                 processes, cached as tokens.py's arrays, mapped by every rank
    loader.py    deterministic distributed batches: each rank its slice of the same global batch;
                 the held-out sets split so every rank runs the same number of forwards
    tasks.py     the shipped tasks, built offline from data that PyPI packages carry, and the unseen
                 set from the standard library (make data)

Where a change goes:
- a new file format: sources.py (a reader) and, if its records are new, sft.py (an encoder).
- a new way to build sequences (packing with attention boundaries, curriculum): packing.py or
  loader.py, on tokens.py's index arrays; the contract with the training side is the batch
  package's Batch and BatchGeometry.
- a new shipped task: tasks.py, then a conf/data/*.yaml that points at it.

Nothing here imports fsdp/ or the config package: dataset.py reads the `data` part of the config
it is handed, and what leaves this package is tokens.py's Sequences (the training set), the
held-out examples (small: lists), and the batch package's Batches. No rank holds the data set
as Python objects: memory per example, never per token.
"""
