"""Copies a float octet (or Hugging Face safetensors) folder with every Linear projection
weight (`*_proj.weight`) replaced by bitsandbytes' 4-bit round trip
`dequantize_4bit(quantize_4bit(W))` on the CPU: the reference octet's 4-bit storage is
measured against (same evaluator, only the weights differ).

Usage: bnb4_roundtrip_folder.py SRC_DIR OUT_DIR nf4|fp4 BLOCK [dq]
`dq` turns on compress_statistics (double-quantized absmax). Prints one JSON object:
{"modules": N, "elements": N, "weight_rel_mse": ...}.
"""
import json
import os
import shutil
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file


def main(src, out, quant_type, block, dq):
    os.makedirs(out)
    n = elements = 0
    err = norm = 0.0
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not name.endswith(".safetensors"):
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(out, name))
            continue
        tensors = load_file(path)
        for k, w in tensors.items():
            if not (k.endswith("_proj.weight") and w.dim() == 2 and w.is_floating_point()):
                continue
            x = w.float().contiguous()
            q, st = F.quantize_4bit(x, blocksize=block, quant_type=quant_type, compress_statistics=dq)
            y = F.dequantize_4bit(q, st)
            err += (y - x).double().pow(2).sum().item()
            norm += x.double().pow(2).sum().item()
            n += 1
            elements += x.numel()
            tensors[k] = y.to(w.dtype).contiguous()
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    print(json.dumps({"modules": n, "elements": elements, "weight_rel_mse": err / max(norm, 1e-300)}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), len(a) > 4 and a[4] == "dq")
