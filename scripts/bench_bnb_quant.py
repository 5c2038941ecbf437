"""Times bitsandbytes' CPU blockwise quantize / dequantize; prints one JSON object per case.

Usage: bench_bnb_quant.py REPEATS ROWSxCOLS:BLOCK ...
Each case reports the median seconds over REPEATS runs (after one warm-up).
"""
import json
import statistics
import sys
import time

import torch
import bitsandbytes.functional as F


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    repeats = int(sys.argv[1])
    torch.manual_seed(0)
    for case in sys.argv[2:]:
        shape, block = case.split(":")
        rows, cols = (int(v) for v in shape.split("x"))
        block = int(block)
        x = torch.randn(rows, cols) * 0.02
        q, state = F.quantize_blockwise(x, blocksize=block)
        quant_s = median_time(lambda: F.quantize_blockwise(x, blocksize=block), repeats)
        deq_s = median_time(lambda: F.dequantize_blockwise(q, state), repeats)
        print(json.dumps({"case": case, "quantize_s": quant_s, "dequantize_s": deq_s}), flush=True)


if __name__ == "__main__":
    main()
