"""Building, finding layers, and loading pretrained weights shard by shard, for several HF architectures."""

from __future__ import annotations

import pytest
import torch

from fsdp.model import TrainableCausalLM, build_model, find_decoder_layer_names, shard_rows
from tests.helpers import ragged_examples, run_distributed, tiny_config

# Architectures checked end to end at world size 2: sharded load is exact, and the sharded loss
# equals the unsharded HF model's own loss. (tied) = tied input/output embeddings.
ARCHITECTURES = [("llama", True), ("mistral", False), ("qwen2", True), ("qwen3", False), ("gemma", True)]
VOCAB = 257  # odd: the two ranks get 129 and 128 rows, so uneven shards are exercised


@pytest.mark.fast
def test_shard_rows_follow_torch_chunk():
    for dim0, world in [(257, 2), (10, 4), (3, 4), (49152, 8)]:
        chunks = torch.arange(dim0).chunk(world)
        for rank in range(world):
            start, end = shard_rows(dim0, world, rank)
            expected = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(start, end)) == expected


@pytest.mark.fast
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "olmo2", "granite"])
def test_decoder_layers_found(arch):
    model = TrainableCausalLM(build_model(tiny_config(arch, layers=3), torch.float32, on_meta=True))
    names = find_decoder_layer_names(model)
    assert len(names) == 3
    assert all(type(model.get_submodule(n)).__name__.endswith(("DecoderLayer", "Block")) for n in names)


@pytest.mark.fast
def test_logit_transforming_models_are_refused():
    config = tiny_config("llama")
    config.logits_scaling = 2.0
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        TrainableCausalLM(build_model(config, torch.float32, on_meta=True))


def save_models(root) -> dict[str, str]:
    """Save one random model per architecture as a HF folder (bf16 safetensors, like hub checkpoints)."""
    folders = {}
    for arch, tie in ARCHITECTURES:
        model = build_model(
            tiny_config(arch, vocab_size=VOCAB, tie=tie), torch.float32, on_meta=False, seed=3
        )
        model.to(torch.bfloat16).save_pretrained(root / arch)
        folders[arch] = str(root / arch)
    return folders


def load_and_compare(d, folders: dict[str, str]) -> dict:
    """On each rank: sharded load of every folder; compare with the files and with the unsharded model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from data.loader import collate
    from fsdp.activation import clean_name
    from fsdp.build import BuildSettings, build_sharded_model
    from fsdp.model import load_hf_config, load_pretrained

    batch = collate(ragged_examples(4, vocab_size=VOCAB, seed=5), pad_id=0)
    results = {}
    for arch, folder in folders.items():
        model = build_sharded_model(
            load_hf_config(folder), d, BuildSettings(precision="fp32"), pretrained=folder
        )
        files = load_file(f"{folder}/model.safetensors")
        bytes_read = load_pretrained(model.causal_lm, folder)  # again, to count what one rank reads
        exact = all(
            torch.equal(p.full_tensor(), files[clean_name(n)].float())
            for n, p in model.causal_lm.named_parameters()
        )
        # Local rows of the embedding on this rank: only a shard is held.
        embed = model.causal_lm.get_input_embeddings().weight
        tied = model.causal_lm.get_output_embeddings().weight is embed
        with torch.no_grad():
            sharded_loss = model(batch.input_ids, batch.position_ids, batch.labels).item()
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = reference(batch.input_ids, position_ids=batch.position_ids).logits
        reference_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        results[arch] = {
            "bytes_read": bytes_read,
            "file_bytes": sum(t.numel() * t.element_size() for t in files.values()),
            "exact": exact,
            "tied": tied,
            "local_embedding_rows": embed.to_local().shape[0],
            "sharded_loss": sharded_loss,
            "reference_loss": reference_loss,
        }
    return results


def test_sharded_load_is_exact_and_matches_hf(tmp_path):
    folders = save_models(tmp_path)
    ranks = run_distributed(load_and_compare, 2, folders)
    for arch, tie in ARCHITECTURES:
        r0, r1 = ranks[0][arch], ranks[1][arch]
        assert r0["exact"] and r1["exact"], arch
        assert r0["tied"] == r1["tied"] == tie, arch
        assert (r0["local_embedding_rows"], r1["local_embedding_rows"]) == (129, 128), arch
        # Each rank reads only its own rows: together, the file exactly once.
        assert r0["bytes_read"] + r1["bytes_read"] == r0["file_bytes"], arch
        assert r0["bytes_read"] < 0.51 * r0["file_bytes"], arch
        assert abs(r0["sharded_loss"] - r0["reference_loss"]) <= 1e-4 * abs(r0["reference_loss"]), arch
