"""Writes ggml block de-quantization test vectors with the gguf package (fixed seed).

Output folder:
  vectors.safetensors   per type T: `T.blocks` (u8, [n, bytes per block]) and `T.values`
                        (f32, [n, elements per block]), gguf's numpy de-quantization of them.
                        Random blocks have valid scales (finite f16 d/dmin of normal size); the
                        first blocks are edge cases: zero scales, all-zero and all-one code
                        bits, negative and negative-zero scales, the largest finite f16 and
                        subnormal f16 scales.
  kquants.gguf          one tensor per type, named after it (lower case), written by
                        GGUFWriter with raw bytes; architecture "ggml-types-test" (no mapping).
  kquants_reference.safetensors
                        each tensor of kquants.gguf read back by GGUFReader and de-quantized by
                        gguf, shaped as stored (outermost first).
  bad_iq2_xxs.gguf      a llama GGUF whose token embedding is IQ2_XXS, which octet refuses.

gguf has no de-quantizer for Q8_K (it is llama.cpp's intermediate type for dot products); its
values here come from ggml's definition, x = d·q with an f32 d, computed with numpy the same
way gguf computes Q8_0.
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import save_file

SEED = 1515
RANDOM_BLOCKS = 24

# Byte offsets of each type's f16 scale fields (d, and dmin/m where the type has one).
F16_SCALES = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
TYPES = list(F16_SCALES) + [Q.Q8_K]


def put_f16(block, offsets, values):
    for off, v in zip(offsets, values):
        block[off:off + 2] = np.array([v], dtype=np.float16).view(np.uint8)


def put_scales(qtype, block, values):
    if qtype == Q.Q8_K:
        block[0:4] = np.array([values[0]], dtype=np.float32).view(np.uint8)
    else:
        put_f16(block, F16_SCALES[qtype], values)


def subnormal_f16(bits):
    return np.array([bits], dtype=np.uint16).view(np.float16)[0]


def edge_blocks(qtype, size, rng):
    big = 1e30 if qtype == Q.Q8_K else 65504.0
    cases = [
        (0x00, [0.0, 0.0]),  # zero scales, zero codes
        (0xFF, [big, big]),  # every code and sub-scale bit set, largest finite scale
        (0xFF, [-1.5, -0.75]),  # negative scales
        (0x00, [0.5, 2.0]),  # smallest codes
        (None, [subnormal_f16(0x0001), subnormal_f16(0x03FF)]),  # subnormal f16 scales
        (None, [-0.0, -0.0]),  # negative zero
        (0xAA, [0.125, -3.0]),
    ]
    for fill, scales in cases:
        if fill is None:
            b = rng.integers(0, 256, size, dtype=np.uint8)
        else:
            b = np.full(size, fill, dtype=np.uint8)
        if qtype == Q.Q8_K and not np.isfinite(np.float32(scales[0])):
            continue
        put_scales(qtype, b, [np.float32(s) for s in scales])
        yield b


def random_blocks(qtype, size, n, rng):
    for _ in range(n):
        b = rng.integers(0, 256, size, dtype=np.uint8)
        # Normal-sized scales of either sign, as a quantizer writes them.
        mag = 10.0 ** rng.uniform(-3.5, 1.0, 2)
        sign = rng.choice([-1.0, 1.0], 2)
        put_scales(qtype, b, list(mag * sign))
        yield b


def dequantize(blocks, qtype):
    if qtype == Q.Q8_K:
        d = blocks[:, 0:4].copy().view(np.float32)
        q = blocks[:, 4:4 + 256].copy().view(np.int8).astype(np.float32)
        return q * d
    return gguf.quants.dequantize(blocks, qtype)


def blocks_of(qtype, rng, n_random):
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = list(edge_blocks(qtype, size, rng)) + list(random_blocks(qtype, size, n_random, rng))
    return np.stack(blocks)


def write_vectors(out, rng):
    tensors = {}
    for qtype in TYPES:
        blocks = blocks_of(qtype, rng, RANDOM_BLOCKS)
        values = dequantize(blocks, qtype).reshape(len(blocks), -1).astype(np.float32)
        assert values.shape[1] == GGML_QUANT_SIZES[qtype][0]
        assert np.isfinite(values).all(), qtype.name
        tensors[f"{qtype.name}.blocks"] = blocks
        tensors[f"{qtype.name}.values"] = values
    save_file(tensors, os.path.join(out, "vectors.safetensors"))


def write_gguf(out, rng):
    path = os.path.join(out, "kquants.gguf")
    w = gguf.GGUFWriter(path, "ggml-types-test")
    for qtype in TYPES:
        be, bb = GGML_QUANT_SIZES[qtype]
        rows, per_row = 3, 512 // be  # two 256-element blocks per row for the K types
        raw = np.stack(list(random_blocks(qtype, bb, rows * per_row, rng)))
        w.add_tensor(qtype.name.lower(), raw.reshape(rows, per_row * bb), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type == Q.Q8_K:
            x = dequantize(np.asarray(t.data).reshape(-1, GGML_QUANT_SIZES[Q.Q8_K][1]), Q.Q8_K)
        else:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
        ref[t.name] = np.ascontiguousarray(
            x.astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        )
    save_file(ref, os.path.join(out, "kquants_reference.safetensors"))


def write_bad_iq(out, rng):
    w = gguf.GGUFWriter(os.path.join(out, "bad_iq2_xxs.gguf"), "llama")
    _, bb = GGML_QUANT_SIZES[Q.IQ2_XXS]
    raw = rng.integers(0, 256, (4, 2 * bb), dtype=np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    write_vectors(out, rng)
    write_gguf(out, rng)
    write_bad_iq(out, rng)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {', '.join(t.name for t in TYPES)}; {total // 1024} KiB")


if __name__ == "__main__":
    main(sys.argv[1])
