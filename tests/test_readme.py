"""The commands the README and the docs/ pages show, each run here scaled down: a small model or few
layers, a few records, one or two steps, the pretrained model where the page's command has one.

The pages are read, not copied: every command in their code blocks must be claimed by a test
(`readme_command` in tests/helpers.py), so a command added later cannot go untested, and a claim no
page shows fails too. Their relative links must point at a file (and a heading, where they name one).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import tests
from fsdp.metrics import read_metrics
from tests.helpers import REPO, fault, losses, readme_command, run, tiny_config

# Lines of a code block that are commands: the ones that start with a program; where a block shows
# a session (`$ command`, then its output), only the `$` lines.
PROGRAMS = ("make ", "python ", "torchrun ", "git ", "(cd ", ".venv/", "pip ")
# `make test` runs this file: CI runs it (.ci/run), and a test below checks that it does.
RUN_BY_CI = {"make test"}
# The guided tour is written by `make tour` from the output of the commands it quotes, which run each
# time it is made: its commands are the generator's, not claims for a test. Its links are checked.
GENERATED_TOUR = "how-fsdp-works.md"


def doc_pages() -> list[Path]:
    """The README and every docs/ page, the generated tour included."""
    return [Path(REPO) / "README.md", *sorted((Path(REPO) / "docs").glob("*.md"))]


def pages_with_commands() -> list[Path]:
    """The pages whose code blocks must show only commands a test runs."""
    return [page for page in doc_pages() if page.name != GENERATED_TOUR]


def readme_commands(text: str) -> list[str]:
    """Every command in a page's code blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + line.strip()
            else:
                lines.append(line)
        session = [line[2:] for line in lines if line.startswith("$ ")]
        for line in session or [line for line in lines if line.startswith(PROGRAMS)]:
            commands.append(re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)).strip())
    return list(dict.fromkeys(commands))


def claimed_commands() -> dict[str, list[str]]:
    """Each claimed command -> the tests that claim it, from every test module."""
    claims: dict[str, list[str]] = {}
    for module_info in pkgutil.iter_modules(tests.__path__):
        if not module_info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"tests.{module_info.name}")
        for name, test in vars(module).items():
            for command in getattr(test, "readme_commands", ()):
                claims.setdefault(command, []).append(f"{module_info.name}.py::{name}")
    return claims


@pytest.mark.fast
def test_every_readme_command_is_run_by_a_test():
    shown: dict[str, list[str]] = {}
    for page in pages_with_commands():
        for command in readme_commands(page.read_text()):
            shown.setdefault(command, []).append(page.relative_to(REPO).as_posix())
    readme = readme_commands((Path(REPO) / "README.md").read_text())
    assert len(shown) > 10 and "make train" in readme and "make test" in readme
    claims = claimed_commands()
    untested = [f"{', '.join(shown[c])}: {c}" for c in shown if c not in claims and c not in RUN_BY_CI]
    assert not untested, "commands no test runs (claim each with @readme_command):\n" + "\n".join(untested)
    stale = [c for c in claims if c not in shown]
    assert not stale, "claimed commands no page shows (README.md, docs/*.md):\n" + "\n".join(stale)
    assert "make test" in (Path(REPO) / ".ci" / "run").read_text()


# A markdown link or image: [text](target) or ![alt](target), the target up to a space or `)`.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
FENCED_BLOCK = re.compile(r"^```[^\n]*\n.*?^```", flags=re.S | re.M)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCED_BLOCK.sub("", text), flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        numbered, count = anchor, 0
        while numbered in anchors:
            count += 1
            numbered = f"{anchor}-{count}"
        anchors.add(numbered)
    return anchors


def broken_links(page: Path) -> list[str]:
    """Each relative link of the page that names no existing file, or no heading of the page it
    names; code blocks are examples, not links."""
    broken = []
    for target in MARKDOWN_LINK.findall(FENCED_BLOCK.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.fast
def test_every_relative_link_in_the_pages_points_at_a_file():
    pages = [*doc_pages(), *sorted((Path(REPO) / "bench" / "results").glob("*.md"))]
    broken = [f"{page.relative_to(REPO)}: {link}" for page in pages for link in broken_links(page)]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


@pytest.mark.fast
def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its `first` part: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#its-first-part-here) [gone](missing.md) [bad](other.md#nowhere) [web](https://x.org)\n"
        "```\n[in a code block](missing-too.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
    ]


@readme_command("make test-fast")
def test_make_test_fast_runs_the_fast_tier_after_lint():
    """`make test-fast` is lint, then pytest on the tests marked fast (the tests themselves run in
    `make test` too, and tests/test_tiers.py checks the marks): its recipe, as make would run it."""
    recipe = subprocess.run(
        ["make", "-n", "-s", "--no-print-directory", "test-fast"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert any(line.endswith("ruff check .") for line in recipe)
    assert recipe[-1].endswith("-m pytest -q -m fast tests")


# --- the headline: a pretrained model on the user's own records ------------------------------------


# The README's GPU recipe, scaled to this machine: its preset with the default pretrained model in
# place of Llama-3-8B, fp32 (tests must not depend on the CPU's bf16), 64-token sequences, 4 of them
# a step whatever the ranks (so 2 ranks and 1 process train alike), no answers (make train's test
# has them), and the pretrained model's step-0 evaluation kept in the test's own folder.
def scaled(tmp: Path) -> list[str]:
    return [
        "model=smollm2-135m",
        "precision=fp32",
        "batch.global_batch_size=4",
        "batch.max_seq_length=64",
        "eval.max_new_tokens=0",
        f"eval.cache_dir={tmp / 'eval-cache'}",
    ]


def user_records(tmp: Path, n: int = 48) -> Path:
    """A user's own file: n prompt/response records in JSON lines."""
    path = tmp / "train.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory) -> dict:
    """The README's recipe on a user's records, as docs/checkpoints.md runs it: on 2 ranks, saved
    every step, a rank killed at step 2; then resume=auto in one process (the one-GPU form), which
    continues from step 1 (DCP reshards the 2 ranks' checkpoint) to the end. (A restart under
    --max-restarts after a rank dies: test_checkpoint.py's elastic restart, bit for bit.)"""
    tmp = tmp_path_factory.mktemp("readme")
    run_dir = tmp / "run"
    argv = [
        "preset=llama3-8b-8xh100",
        "data=jsonl",
        f"data.path={user_records(tmp)}",
        *scaled(tmp),
        "train.max_steps=2",
        "checkpoint.every_steps=1",
        "export.enabled=false",  # the pretrained export: make train's test; from a checkpoint: test_checkpoint.py's
        f"run_dir={run_dir}",
        f"data.cache_dir={tmp / 'tokenized'}",
    ]
    # Tokenized beforehand, as a long job would be; the run then maps the same cache.
    prepared = subprocess.run(
        [sys.executable, "prepare.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    first = run(argv, nproc=2, env=fault(action="kill", at="step", step=2, rank=1))
    checkpoints_after_kill = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # Its end needs no checkpoint: the first job's saves are what is tested.
    second = run([*argv, "resume=auto", "checkpoint.every_steps=null", "checkpoint.at_end=false"], nproc=None)
    return {
        "run_dir": run_dir,
        "prepared": prepared,
        "first": first,
        "second": second,
        "checkpoints_after_kill": checkpoints_after_kill,
    }


@readme_command(
    "torchrun --standalone --nproc_per_node=8 train.py preset=llama3-8b-8xh100 data=jsonl data.path=train.jsonl",
    "torchrun --nproc_per_node=8 train.py preset=llama3-8b-8xh100 ... checkpoint.every_steps=200",
)
def test_the_recipe_on_a_users_records_trains_a_pretrained_model_and_saves(own_data_run):
    first = own_data_run["first"]
    assert first.returncode != 0  # killed at step 2, as asked
    assert "IndexError" not in first.stderr
    assert "fulltune  preset=llama3-8b-8xh100" in first.stdout and "2 x cpu (gloo)" in first.stdout
    assert "134,515,008 params" in first.stdout  # SmolLM2-135M, pretrained, whole
    assert "no held-out set" in first.stdout  # the user's file alone: nothing to evaluate, no crash
    assert own_data_run["checkpoints_after_kill"] == ["step-00000001"]


@readme_command("python prepare.py preset=llama3-8b-8xh100 data=jsonl data.path=train.jsonl")
def test_prepare_tokenizes_once_and_the_run_maps_it(own_data_run):
    prepared = own_data_run["prepared"]
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    line = re.search(
        r"data +(\S+): ([\d,]+) tokens, .* \(([\d.]+) bytes per token\); tokenized in", prepared.stdout
    )
    assert line, prepared.stdout
    folder, tokens = Path(line[1]), int(line[2].replace(",", ""))
    # 48 records of about 50 tokens: each token id in 2 bytes (SmolLM2's vocabulary fits) and its
    # target flag in 1; each example's offset and target count in 12; beside them, the meta.json.
    arrays = sum(f.stat().st_size for f in folder.iterdir() if f.name != "meta.json")
    assert 2000 < tokens < 3000 and arrays == 3 * tokens + 12 * 48 + 8
    assert float(line[3]) == pytest.approx(sum(f.stat().st_size for f in folder.iterdir()) / tokens, abs=0.01)
    assert "domain/train:   48 examples" in prepared.stdout
    assert "tokenizing: 100%" in prepared.stderr and "tokens/s" in prepared.stderr  # the progress bar
    assert re.search(r"prepared in [\d.]+ s from the cache", own_data_run["first"].stdout)


@readme_command(
    "python train.py preset=llama3-8b-8xh100 data=jsonl data.path=train.jsonl",
    "torchrun --nproc_per_node=8 train.py preset=llama3-8b-8xh100 ... resume=auto",
)
def test_resume_auto_in_one_process_continues_the_recipe_to_its_end(own_data_run):
    second, run_dir = own_data_run["second"], own_data_run["run_dir"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 x cpu (gloo)" in second.stdout and "(step 1, saved by 2 ranks)" in second.stdout
    train_rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]  # step 1 from the first job, step 2 once
    assert all(0 < loss < 10 for loss in losses(run_dir))  # a pretrained model's loss, not ln(49152)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


# --- the default job --------------------------------------------------------------------------------


@readme_command("make train")
def test_make_train(tmp_path):
    """The default job through make, on 64 of its records, one step, short answers, no checkpoint at
    the end; everything else as the README's `make train` runs it (2 ranks, its eval sets, own
    answers, export)."""
    records = tmp_path / "medical.jsonl"
    with open(Path(REPO) / ".cache" / "data" / "medical-terms" / "train.jsonl") as f:
        records.write_text("".join(next(f) for _ in range(64)))
    run_dir = tmp_path / "run"
    scale = [
        f"run_dir={run_dir}",
        f"data.path={records}",
        "train.max_steps=1",
        "eval.max_examples=4",
        "eval.max_new_tokens=2",
        "eval.own_answers.max_new_tokens=2",
        f"eval.cache_dir={tmp_path / 'eval-cache'}",
        "checkpoint.at_end=false",  # the 1.6 GB save: the recipe's test saves
    ]
    result = subprocess.run(
        ["make", "train", f"ARGS={' '.join(scale)}"],
        cwd=REPO,
        env=outside_make(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fulltune  preset=cpu-demo" in result.stdout and "2 x cpu (gloo)" in result.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report["sets"]) == {"domain", "general", "unseen", "own_answers"}
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "generations.md").is_file()


# --- memory before buying GPUs ------------------------------------------------------------------------

# Llama-3-8B's shapes (its 128k vocabulary and 4096 x 14336 layers) with 2 of its 32 layers and
# 256-token sequences: the same program, seconds instead of a minute each.
FEWER_LAYERS = [
    "+model.config_overrides.num_hidden_layers=2",
    "batch.max_seq_length=256",
    "loss.chunk_tokens=128",
]


def make_estimate_argv(command: str) -> list[str]:
    """The arguments `make estimate ...` hands estimate.py (make -n prints its recipe, runs nothing)."""
    printed = subprocess.run(
        ["make", "-n", "--no-print-directory", *shlex.split(command)[1:]],
        cwd=REPO,
        env=outside_make(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    words = shlex.split(printed.replace("\\\n", " "))
    return words[words.index("estimate.py") + 1 :]


def outside_make() -> dict[str, str]:
    """The environment of a user's shell: `make test` runs this file, and a make started from it
    would otherwise take the outer make's flags (and print which folders it enters)."""
    return {
        k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    }


ESTIMATES = [
    "make estimate MODEL=llama3-8b GPUS=8",
    "make estimate MODEL=llama3-8b GPUS=8 AC=none",
    "make estimate MODEL=llama3-8b GPUS=1 GIB=80",
    "make estimate MODEL=llama3-8b GPUS=2 GIB=24",
    "make estimate MODEL=llama3-8b GPUS=8 GIB=80",
    "python estimate.py preset=llama3-8b-8xh100 memory.world_size=8",
]


@readme_command(*ESTIMATES)
@pytest.mark.parametrize("command", ESTIMATES)
def test_estimate_commands(command, capsys):
    import estimate

    argv = make_estimate_argv(command) if command.startswith("make ") else shlex.split(command)[2:]
    assert "memory.world_size=" + re.search(r"(GPUS=|world_size=)(\d+)", command)[2] in argv
    assert estimate.main([*argv, *FEWER_LAYERS]) == 0
    out = capsys.readouterr().out
    gpus = int(re.search(r"(GPUS=|world_size=)(\d+)", command)[2])
    assert f"rank 0 of {gpus}" in out
    peak = next(line for line in out.splitlines() if line.strip().startswith("peak "))
    analytic, fake = (float(x) for x in peak.split()[-2:])
    assert fake > 0 and abs(analytic - fake) <= 0.15 * fake
    if "GIB=" in command:
        assert "what fits in" in out and "to run it:" in out


@readme_command("torchrun --nproc_per_node=2 bench/memory_check.py")
def test_memory_check(tmp_path):
    """The three views side by side on 2 real ranks, on a small Llama in place of SmolLM2 (the
    command's model is random-init, so only its size is scaled), fp32 (the CPU's bf16 may be
    emulated), one run of 32-token sequences."""
    tiny_config().save_pretrained(tmp_path / "model")
    out = tmp_path / "memory-check.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "bench/memory_check.py",
            f"--config={tmp_path / 'model'}",
            "--precision=fp32",
            "--runs=none",
            "--seq=32",
            f"--out={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    views = json.loads(out.read_text())["none"]
    analytic, fake, measured = (
        views[v]["categories"]["sharded params"] for v in ("analytic", "fake", "measured")
    )
    assert analytic == fake == measured > 0
