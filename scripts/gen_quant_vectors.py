"""Writes blockwise-quantization test vectors made by bitsandbytes (CPU), fixed seed.

Output: a safetensors file with the dynamic codes and, per case, the input x, bitsandbytes'
q / absmax, and bitsandbytes' own de-quantization of them. Cases cover normal and heavy-tailed
inputs, a weight-like matrix, partial last blocks, an all-zero block and every block size.
"""
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file

BLOCK_SIZES = [64, 128, 256, 512, 1024, 2048, 4096]


def cases(g):
    n = 10_007  # odd, so the last block is partial for every block size
    for b in BLOCK_SIZES:
        yield f"normal_b{b}", torch.randn(n, generator=g), b
    for b in (256, 4096):
        t = torch.distributions.StudentT(torch.tensor(2.5)).sample((n,))
        yield f"heavy_b{b}", t.float(), b
    # weight-like: small normal weights with a few outlier input features, GPT-style scale
    w = torch.randn(131, 517, generator=g) * 0.02
    w[:, torch.randint(0, 517, (5,), generator=g)] *= 12.0
    for b in (64, 256, 4096):
        yield f"weight_b{b}", w.clone(), b
    z = torch.randn(3 * 256 + 100, generator=g)
    z[256:512] = 0.0  # one whole block of zeros
    yield "zeroblock_b256", z, 256
    yield "tiny_b64", torch.randn(37, generator=g), 64


def main(out_path):
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    tensors = {
        "code_signed": F.create_dynamic_map(signed=True).float(),
        "code_unsigned": F.create_dynamic_map(signed=False).float(),
    }
    for name, x, b in cases(g):
        x = x.float().contiguous()
        q, state = F.quantize_blockwise(x, blocksize=b)
        deq = F.dequantize_blockwise(q, state)
        tensors[f"{name}.x"] = x
        tensors[f"{name}.q"] = q.contiguous()
        tensors[f"{name}.absmax"] = state.absmax.float().contiguous()
        tensors[f"{name}.code"] = state.code.float().contiguous()
        tensors[f"{name}.deq"] = deq.float().contiguous()
        tensors[f"{name}.block"] = torch.tensor([b], dtype=torch.int64)
    save_file(tensors, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
