"""Checks an octet 4-bit folder against bitsandbytes: every 4-bit module's packed codes and
absmax must equal bitsandbytes' `quantize_4bit` of the source's float weight. A folder whose
scales are double-quantized (`absmax_q`, `absmax_scale`, `absmax_offset`) is checked against
`quantize_4bit(..., compress_statistics=True)`: its 8-bit scales, per-group absmax and offset.

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
        dq = module + ".absmax_q" in out
        q, st = F.quantize_4bit(w, blocksize=block, quant_type=quant_type, compress_statistics=dq)
        same = torch.equal(q.reshape(-1), out[module + ".weight"].reshape(-1))
        if dq:
            same = (
                same
                and torch.equal(st.absmax.reshape(-1), out[module + ".absmax_q"].reshape(-1))
                and torch.equal(st.state2.absmax.float(), out[module + ".absmax_scale"].float())
                and torch.equal(st.offset.float().reshape(-1), out[module + ".absmax_offset"].float())
            )
        else:
            same = same and torch.equal(st.absmax.float(), out[module + ".absmax"].float())
        checked += 1
        if not same:
            bad.append(module)
    print(json.dumps({"modules": checked, "mismatches": bad}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
