"""Checks an octet 4-bit folder against bitsandbytes: every 4-bit module's packed codes and
absmax must equal bitsandbytes' `quantize_4bit` of the source's float weight.

Usage: bnb4_folder_check.py SOURCE_SAFETENSORS OCTET_FOLDER QUANT_TYPE BLOCK
Prints JSON: {"modules": n, "mismatches": [names]}.
"""
import glob
import json
import os
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file


def main(src, folder, quant_type, block):
    source = load_file(src)
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    checked, bad = 0, []
    for name, code in out.items():
        if not name.endswith(".code") or code.numel() != 16:
            continue
        module = name[: -len(".code")]
        w = source[module + ".weight"].float()
        q, st = F.quantize_4bit(w, blocksize=block, quant_type=quant_type)
        same = torch.equal(q.reshape(-1), out[module + ".weight"].reshape(-1)) and torch.equal(
            st.absmax.float(), out[module + ".absmax"].float()
        )
        checked += 1
        if not same:
            bad.append(module)
    print(json.dumps({"modules": checked, "mismatches": bad}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
