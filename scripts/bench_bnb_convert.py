"""bitsandbytes side of the conversion bench: quantizes every Linear/Embedding weight of a
(sharded) safetensors GPT-J checkpoint with blockwise 8-bit (block 4096), tensor by tensor
through memory-mapped reads, and writes nothing (a lower bound on a Python converter's time).

Usage: bench_bnb_convert.py MODEL_DIR
"""
import json
import os
import sys

import bitsandbytes.functional as F
from safetensors import safe_open

QUANTIZED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc_in.weight", "fc_out.weight",
             "wte.weight", "lm_head.weight")


def main():
    model = sys.argv[1]
    index = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(model, shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name.endswith(QUANTIZED):
                    F.quantize_blockwise(t.contiguous(), blocksize=4096)
                del t


if __name__ == "__main__":
    main()
