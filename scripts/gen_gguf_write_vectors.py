"""Writes f32 → Q8_0 / F16 / BF16 conversion vectors with the gguf package (fixed seed).

Output folder:
  vectors.safetensors   `inputs` (f32, [rows, 64]) and, per type T in q8_0, f16 and bf16,
                        `T` (u8, [rows, bytes per row]): `gguf.quants.quantize(inputs, T)`.
The first rows are edge cases: zeros and negative zeros, ties at .5 after scaling, f32's
largest values, subnormals (which make Q8_0's reciprocal scale overflow), values past f16's
range, f16 and bf16 rounding ties, infinities and a quiet NaN. The rest are random rows of
widely varying magnitude.
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from safetensors.numpy import save_file

SEED = 1919
ROW = 64
RANDOM_ROWS = 24
F32_MAX = np.finfo(np.float32).max
TINY = np.float32(2.0**-149)


def row(values):
    """`values` repeated (or cut) to one row of ROW f32s."""
    v = np.asarray(values, dtype=np.float32).ravel()
    return np.resize(v, ROW).astype(np.float32)


def edge_rows():
    ties = np.arange(-31.5, 32.5, 1.0)  # with 127 in the block d = 1: exact .5 ties
    ties[0] = 127.0
    return [
        row([0.0]),
        row([-0.0]),
        row(ties),
        row(ties * 4.0),  # d = 4, still exact ties
        row([F32_MAX, -F32_MAX, 1.0, -1.0]),
        row([-F32_MAX, 3e38, 1e30, 0.0]),
        row([TINY, -TINY, 0.0, 100 * TINY]),
        row([2.0**-122, -(2.0**-125), 2.0**-140, 0.0]),
        row([1e-40, -3e-39, 1e-45, 5e-41]),
        row([1e10, -2.5e9, 1.0, 65504.0 * 127]),
        row([65504.0 * 127.0, 65519.0 * 127.0, -8.3e6, 7.0]),
        # f16: largest finite, the tie to infinity, subnormals and their ties, 2^-25 (tie to 0)
        row([65504.0, 65519.0, 65520.0, -65520.0, 6e-8, 2.0**-25, 3 * 2.0**-25, 2.0**-24]),
        # f16 and bf16 round-to-nearest-even ties above and below 1
        row([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 0.5 + 2.0**-12]),
        row([np.inf, -np.inf, 1.0, -2.0]),
        row([np.nan, 1.0, -1.0, 0.5]),
    ]


def random_rows(rng):
    rows = []
    for i in range(RANDOM_ROWS):
        scale = 10.0 ** rng.uniform(-8, 6)
        r = rng.standard_normal(ROW) * scale
        if i % 3 == 0:
            r[rng.integers(ROW)] *= 1000.0  # one outlier per block pair
        rows.append(r.astype(np.float32))
    return rows


def main(out):
    rng = np.random.default_rng(SEED)
    inputs = np.stack(edge_rows() + random_rows(rng)).astype(np.float32)
    with np.errstate(all="ignore"):
        tensors = {
            "inputs": inputs,
            "q8_0": quantize(inputs, Q.Q8_0).view(np.uint8),
            "f16": quantize(inputs, Q.F16).view(np.uint8),
            "bf16": quantize(inputs, Q.BF16).view(np.uint8),
        }
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "vectors.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
