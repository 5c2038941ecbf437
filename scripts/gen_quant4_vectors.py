"""Writes 4-bit (NF4 / FP4) test vectors made by bitsandbytes on the CPU, fixed seed.

Output: a safetensors file with bitsandbytes' two 4-bit codes and, per case, the input x,
bitsandbytes' packed codes and absmax (`quantize_4bit`), and its own de-quantization of them
(`dequantize_4bit`) in f32, bf16 and f16. Cases cover every block size bitsandbytes accepts,
partial last blocks, an odd element count, an all-zero block, a weight-like matrix and a bf16
input; the `dq_` cases also carry the double-quantized absmax (`compress_statistics=True`).
"""
import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file

BLOCK_SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def cases(g):
    for b in BLOCK_SIZES:
        # odd, so the last block is partial and the last byte holds one padding code
        yield f"normal_b{b}", torch.randn(6_001, generator=g), b
    w = torch.randn(96, 640, generator=g) * 0.02
    w[:, torch.randint(0, 640, (4,), generator=g)] *= 10.0
    for b in (32, 64, 256, 2048):
        yield f"weight_b{b}", w.clone(), b
    z = torch.randn(4 * 64 + 30, generator=g)
    z[64:128] = 0.0
    z[-30:] = 0.0  # a zero partial block
    yield "zeros_b64", z, 64
    yield "tiny_b64", torch.randn(7, generator=g), 64
    yield "bf16_b64", (torch.randn(33, 64, generator=g) * 0.05).bfloat16(), 64


def dequantize(q, st, dtype, shape):
    """bitsandbytes' own de-quantization, through a 1-D view of the state.

    bitsandbytes 0.50's CPU 4-bit kernel takes the shape as (rows, n) and numbers each row's
    blocks from n // blocksize, so a 2-D tensor whose last dimension is not a multiple of the
    block size gets the wrong scale on every row after the first (the [96, 640] weight at
    block 256). Blocks run over the flattened tensor, as quantize_4bit numbered them; the
    1-D view is that layout for every shape.
    """
    st.dtype = dtype
    st.shape = torch.Size([shape.numel()])
    out = F.dequantize_4bit(q, st).reshape(shape).contiguous()
    st.shape = shape
    return out


def main(out_path):
    g = torch.Generator().manual_seed(4444)
    tensors = {
        "code.nf4": F.get_4bit_type("nf4", device="cpu").float().contiguous(),
        "code.fp4": F.get_4bit_type("fp4", device="cpu").float().contiguous(),
    }
    for name, x, b in cases(g):
        tensors[f"{name}.x"] = x.contiguous()
        tensors[f"{name}.block"] = torch.tensor([b], dtype=torch.int64)
        for qt in ("nf4", "fp4"):
            key = f"{name}.{qt}"
            q, st = F.quantize_4bit(x, blocksize=b, quant_type=qt)
            tensors[f"{key}.q"] = q.reshape(-1).contiguous()
            tensors[f"{key}.absmax"] = st.absmax.float().contiguous()
            for dt, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")):
                tensors[f"{key}.deq_{tag}"] = dequantize(q, st, dt, x.shape)
            if b == 64 or name.startswith("weight"):
                q2, st2 = F.quantize_4bit(x, blocksize=b, quant_type=qt, compress_statistics=True)
                assert torch.equal(q2, q)
                tensors[f"{key}.dq.qabsmax"] = st2.absmax.contiguous()
                tensors[f"{key}.dq.absmax2"] = st2.state2.absmax.float().contiguous()
                tensors[f"{key}.dq.code2"] = st2.state2.code.float().contiguous()
                tensors[f"{key}.dq.offset"] = st2.offset.float().reshape(1).contiguous()
                tensors[f"{key}.dq.deq_f32"] = dequantize(q2, st2, torch.float32, x.shape)
    save_file(tensors, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
