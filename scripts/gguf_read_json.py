"""Prints what the gguf package's GGUFReader reads from a GGUF file, as JSON on stdout.

  {"alignment": int, "data_offset": int,
   "metadata": {key: {"types": [type names], "value": value}},
   "tensors": [{"name", "type", "shape" (outermost first), "offset" (absolute),
                "bytes" (hex of the stored data), "values" (gguf's de-quantization, as the
                f32 bit patterns)}]}
Used by the GGUF writer's round-trip test as an independent reader.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main(path):
    r = GGUFReader(path)
    metadata = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own entries for the header counts and version
        value = field.contents()
        metadata[key] = {"types": [t.name for t in field.types], "value": value}
    tensors = []
    for t in r.tensors:
        raw = np.ascontiguousarray(t.data).view(np.uint8)
        values = dequantize(raw, t.tensor_type).astype(np.float32).ravel()
        tensors.append(
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "shape": [int(d) for d in reversed(t.shape.tolist())],
                "offset": int(t.data_offset),
                "bytes": raw.tobytes().hex(),
                "values": values.view(np.uint32).tolist(),
            }
        )
    out = {
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "metadata": metadata,
        "tensors": tensors,
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
