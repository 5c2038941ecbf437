"""Writes double-quantized absmax test vectors made by bitsandbytes 0.50 (CPU), fixed seed.

bitsandbytes' `compress_statistics=True`: offset = absmax.mean(), then
`quantize_blockwise(absmax - offset, blocksize=256)` with the signed dynamic code. Per case the
file holds the f32 block scales (`.absmax`), bitsandbytes' q / group absmax / offset and its own
de-quantization (`dequantize_blockwise(q, state2) + offset`).

Cases: the scales of real 4-bit quantizations (nf4 and fp4, block 64, compress_statistics=True,
taken from bitsandbytes' QuantState), the scales of 8-bit blockwise quantizations of weight-like
matrices at several block sizes, a partial last group, fewer scales than one group, and
constant scales (an all-zero group).
"""
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file


def compress(absmax):
    """bitsandbytes' own double quantization of f32 scales, as quantize_4bit does it."""
    offset = absmax.mean()
    q, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    deq = F.dequantize_blockwise(q, state2)
    deq += offset
    return q, state2.absmax, offset, deq, state2.code


def weight_like(g, rows, cols):
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, torch.randint(0, cols, (7,), generator=g)] *= 12.0
    return w


def main(out_path):
    g = torch.Generator().manual_seed(4321)
    torch.manual_seed(4321)
    tensors = {}

    def put(name, absmax, q, scales, offset, deq):
        tensors[f"{name}.absmax"] = absmax.float().contiguous()
        tensors[f"{name}.q"] = q.contiguous()
        tensors[f"{name}.group_absmax"] = scales.float().contiguous()
        tensors[f"{name}.offset"] = offset.reshape(1).float().contiguous()
        tensors[f"{name}.deq"] = deq.float().contiguous()

    # Real 4-bit states: bitsandbytes' QuantState with nested statistics.
    for quant_type in ("nf4", "fp4"):
        w = weight_like(g, 300, 576)
        _, plain = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        _, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert state.nested
        deq = F.dequantize_blockwise(state.absmax, state.state2)
        deq += state.offset
        put(f"{quant_type}_b64", plain.absmax, state.absmax, state.state2.absmax,
            torch.as_tensor(state.offset), deq)
    # 8-bit blockwise scales of weight-like matrices.
    for b in (64, 256, 4096):
        w = weight_like(g, 411, 1023)
        _, st = F.quantize_blockwise(w, blocksize=b)
        q, scales, offset, deq, code2 = compress(st.absmax)
        put(f"blockwise_b{b}", st.absmax, q, scales, offset, deq)
    # Heavy-tailed scales, fewer than one group, constant (one all-zero group).
    heavy = torch.distributions.StudentT(torch.tensor(2.0)).sample((1000,)).abs().float() + 1e-3
    for name, a in (
        ("heavy", heavy),
        ("short", torch.rand(37, generator=g) * 0.1),
        ("constant", torch.full((300,), 0.25)),
    ):
        q, scales, offset, deq, _ = compress(a)
        put(name, a, q, scales, offset, deq)
    tensors["code_signed"] = F.create_dynamic_map(signed=True).float()
    save_file(tensors, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
