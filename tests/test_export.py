"""Export round trip: the Hugging Face folder reproduces the trained sharded model."""

from __future__ import annotations

import json

import torch

from tests.helpers import DEFAULT_MODEL, ragged_examples, run_distributed, tiny_config


def train_and_export(d, out_fp32: str, out_bf16: str) -> dict:
    from transformers import AutoTokenizer

    from batch import BatchGeometry
    from data.loader import DistributedBatchLoader, collate
    from fsdp.activation import clean_name
    from fsdp.adamw import AdamW, param_groups
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.export import ExportTarget, export_hf
    from fsdp.step import train_step

    result = {}
    # Tied llama with the default tokenizer, fp32 export in one file; untied mistral, bf16, split files.
    for arch, tie, out, dtype, max_bytes in (
        ("llama", True, out_fp32, "fp32", 2**30),
        ("mistral", False, out_bf16, "bf16", 40_000),
    ):
        model = build_sharded_model(
            tiny_config(arch, tie=tie), d, BuildSettings(precision="mixed", checkpointing="full")
        )
        optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
        loader = DistributedBatchLoader(
            ragged_examples(16), BatchGeometry(2, 2, d.world_size, 64), d.rank, 0, 0
        )
        for _ in range(2):
            train_step(model, optimizer, loader.next_step(), 1.0)
        batch = collate(ragged_examples(3, seed=9), pad_id=0)
        with torch.no_grad():
            logits = model(batch.input_ids, batch.position_ids)
        tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL) if arch == "llama" else None
        info = export_hf(model.causal_lm, ExportTarget(out, dtype, max_bytes), tokenizer, d.is_main)
        params = {clean_name(n): p.full_tensor() for n, p in model.causal_lm.named_parameters()}
        result[arch] = {"logits": logits, "input_ids": batch.input_ids, "info": info, "params": params}
    return result


def test_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_fp32, out_bf16 = tmp_path / "fp32", tmp_path / "bf16"
    ranks = run_distributed(train_and_export, 2, str(out_fp32), str(out_bf16))
    trained = ranks[0]
    assert ranks[1]["llama"]["info"] == {}  # rank 1 wrote nothing

    # fp32: one file, tied embeddings stay tied, logits reproduced.
    llama = trained["llama"]
    assert llama["info"]["files"] == 1 and (out_fp32 / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out_fp32).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        logits = loaded(llama["input_ids"]).logits.float()
    # The sharded model computed in bf16 (mixed); the export holds the fp32 master weights.
    fp32_reference = AutoModelForCausalLM.from_pretrained(out_fp32, dtype=torch.float32).eval()
    for name, param in fp32_reference.named_parameters():
        if name in llama["params"]:
            assert torch.equal(param, llama["params"][name]), name
    assert (logits - llama["logits"]).abs().max().item() <= 0.05 * llama["logits"].abs().max().item()
    assert AutoTokenizer.from_pretrained(out_fp32).chat_template

    # bf16 past the size threshold: several files and an index; values are the bf16 rounding of the master.
    mistral = trained["mistral"]
    index = json.loads((out_bf16 / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert mistral["info"]["files"] == len(files) > 1
    assert "lm_head.weight" in index["weight_map"]
    loaded = AutoModelForCausalLM.from_pretrained(out_bf16)
    assert loaded.dtype == torch.bfloat16
    for name, param in loaded.named_parameters():
        assert torch.equal(param, mistral["params"][name].to(torch.bfloat16)), name
    assert json.loads((out_bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def fp32_logits_roundtrip(d, out: str) -> dict:
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.export import ExportTarget, export_hf

    model = build_sharded_model(tiny_config(), d, BuildSettings(precision="fp32"))
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids)
    export_hf(model.causal_lm, ExportTarget(out, "fp32", 2**30), is_main=d.is_main)
    return {"logits": logits, "input_ids": input_ids}


def test_fp32_export_reproduces_logits_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    ranks = run_distributed(fp32_logits_roundtrip, 2, str(tmp_path / "m"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(ranks[0]["input_ids"]).logits
    assert (logits - ranks[0]["logits"]).abs().max().item() <= 1e-5
