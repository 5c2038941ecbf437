"""Writes an octet 8-bit folder in format version 1 (the layout of octet 0.1.0, before
octet.toml recorded a format version), independently of octet: tiny GPT-J's Linear weights
quantized by bitsandbytes' blockwise 8-bit (dynamic code, block 64) and stored as
`weight` (uint8) + `absmax` (f32) + `code` (f32), plus transformers' logits on the same
de-quantized weights as the reference a reader must reproduce.

Usage: gen_octet_v1_folder.py TINY_GPTJ_HF_DIR OUT_DIR
"""
import json
import os
import shutil
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPTJConfig, GPTJForCausalLM

QUANTIZED = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "lm_head")
BLOCK = 64


def main(src, out):
    os.makedirs(out, exist_ok=True)
    weights = load_file(os.path.join(src, "model.safetensors"))
    stored, dequantized = {}, {}
    for name, t in sorted(weights.items()):
        module, _, param = name.rpartition(".")
        if param == "weight" and module.split(".")[-1] in QUANTIZED:
            q, state = F.quantize_blockwise(t.float().contiguous(), blocksize=BLOCK)
            stored[name] = q.contiguous()
            stored[f"{module}.absmax"] = state.absmax.float().contiguous()
            stored[f"{module}.code"] = state.code.float().contiguous()
            dequantized[name] = F.dequantize_blockwise(q, state).float()
        else:
            stored[name] = t.contiguous()
            dequantized[name] = t
    save_file(stored, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "octet_arch": "gptj"})
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(out, f))
    with open(os.path.join(out, "octet.toml"), "w") as f:
        f.write('arch = "gptj"\nblock_size = 64\ncode = "dynamic"\noctet_version = "0.1.0"\n')
        f.write('source = []\n')
    config = GPTJConfig.from_dict(json.load(open(os.path.join(src, "config.json"))))
    model = GPTJForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(dequantized, strict=False)
    assert not unexpected, unexpected
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 5, 88, 140, 1, 33]])
    with torch.no_grad():
        logits = model(ids).logits.float()
    save_file({"input_ids": ids, "logits": logits.contiguous()},
              os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
