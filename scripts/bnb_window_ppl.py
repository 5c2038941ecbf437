"""Perplexity of a Hugging Face causal LM in f32 and with its weights quantized blockwise to
8 bits by bitsandbytes and de-quantized again (the oracle octet's 8-bit storage is measured
against in tests/smollm2.rs).

Usage: bnb_window_ppl.py MODEL_DIR IDS.safetensors WINDOW BLOCK MODULES.json

MODULES.json is a JSON list of module paths (`model.layers.0.self_attn.q_proj`, ...): each
must be an nn.Linear or nn.Embedding of the model; its weight is replaced by
dequantize_blockwise(quantize_blockwise(W, blocksize=BLOCK)) with bitsandbytes' default
(signed dynamic) code, on the CPU. A weight shared by two modules (tied embeddings) is
quantized once. Perplexity as in hf_window_ppl.py (disjoint windows of WINDOW tokens, no BOS).
Prints one JSON object: {"f32": {...}, "bnb": {...}, "modules": N, "elements": N,
"weight_rel_mse": ...}. Nothing random is involved.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_window_ppl import window_ppl  # noqa: E402


@torch.no_grad()
def quantize_modules(model, paths, block):
    """Replaces each listed module's weight by its bitsandbytes round trip; returns
    (modules, elements, relative MSE of the weights)."""
    mods = dict(model.named_modules())
    done, elements, err, norm = set(), 0, 0.0, 0.0
    for path in paths:
        m = mods.get(path)
        if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            sys.exit(f"{path}: not a Linear or Embedding of the model ({type(m).__name__})")
        w = m.weight
        if w.data_ptr() in done:
            continue
        done.add(w.data_ptr())
        x = w.data.float().contiguous()
        q, state = bnbf.quantize_blockwise(x, blocksize=block)
        y = bnbf.dequantize_blockwise(q, state)
        if q.dtype != torch.uint8 or state.absmax.numel() != -(-x.numel() // block):
            sys.exit(f"{path}: unexpected bitsandbytes output {q.dtype}, {state.absmax.shape}")
        err += (y - x).double().pow(2).sum().item()
        norm += x.double().pow(2).sum().item()
        elements += x.numel()
        w.data.copy_(y.to(w.dtype))
    return len(done), elements, err / norm


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir, ids_path, window, block, modules = sys.argv[1:]
    window, block = int(window), int(block)
    with open(modules, encoding="utf-8") as f:
        paths = json.load(f)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = load_file(ids_path)["input_ids"].long().flatten()
    f32 = window_ppl(model, ids, window)
    n, elements, rel_mse = quantize_modules(model, paths, block)
    bnb = window_ppl(model, ids, window)
    print(
        json.dumps(
            {
                "f32": f32,
                "bnb": bnb,
                "modules": n,
                "elements": elements,
                "weight_rel_mse": rel_mse,
                "block": block,
                "bitsandbytes": bitsandbytes.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
