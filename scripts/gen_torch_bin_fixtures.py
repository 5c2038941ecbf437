#!/usr/bin/env python3
"""Writes torch.save fixtures for tests/torch_bin.rs into the directory argv[1].

- state.bin            torch.save of an OrderedDict covering every dtype octet reads, a transposed
                       (non-contiguous) view, an expanded (stride-0) view, two views sharing one
                       storage at different offsets, a 0-d scalar, an empty tensor, a Parameter,
                       GPT-J-8bit-style uint8 weight + absmax + code entries, non-tensor entries
                       (an int, a nested dict holding an int and a tensor) and `_metadata`
                       (pickled through BUILD, as nn.Module.state_dict() does).
- state.safetensors    the same tensors, contiguous, for comparison (nested names `.`-joined).
- names.json           the tensor names in the order the reader must report them.
- state_deflated.bin   state.bin re-zipped with every entry deflated.
- evil.bin             a torch.save-shaped zip whose data.pkl calls os.system. Never load it.

Every file is written to a temporary name and renamed, so an interrupted run leaves no partial file.
"""
import collections
import json
import os
import pickle
import sys
import zipfile

import torch
from safetensors.torch import save_file


def replace_into(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


class Evil:
    """Unpickling this with Python's pickle would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234)

    shared = torch.randn(32)
    weight = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(4, 5)
    sd["f16"] = torch.randn(3, 7).half()
    sd["bf16"] = torch.randn(2, 3, 4).bfloat16()
    sd["f64"] = torch.randn(3).double()
    sd["i64"] = torch.randint(-(2**40), 2**40, (6,), dtype=torch.int64)
    sd["i32"] = torch.randint(-(2**30), 2**30, (5,), dtype=torch.int32)
    sd["i16"] = torch.randint(-(2**14), 2**14, (4,), dtype=torch.int16)
    sd["i8"] = torch.randint(-128, 128, (9,), dtype=torch.int8)
    sd["bool"] = torch.rand(2, 5) > 0.5
    sd["transformer.h.0.attn.q_proj.weight"] = weight
    sd["transformer.h.0.attn.q_proj.absmax"] = weight.float().abs().amax().reshape(1)
    sd["transformer.h.0.attn.q_proj.code"] = torch.linspace(-1, 1, 256)
    sd["transposed"] = torch.randn(3, 4).t()
    sd["expanded"] = torch.randn(3, 1).expand(3, 4)
    sd["shared.a"] = shared[4:10]
    sd["shared.b"] = shared[12:24].view(3, 4)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(3))
    sd["step"] = 7
    sd["extra"] = {"count": 3, "weight": torch.randn(2)}
    sd._metadata = collections.OrderedDict({"": {"version": 1}})

    assert not sd["transposed"].is_contiguous()
    assert sd["shared.a"].untyped_storage().data_ptr() == sd["shared.b"].untyped_storage().data_ptr()

    state_bin = os.path.join(out, "state.bin")
    replace_into(state_bin, lambda p: torch.save(sd, p))

    flat = collections.OrderedDict()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            flat[k] = v
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, torch.Tensor):
                    flat[f"{k}.{k2}"] = v2
    # contiguous() + clone(): safetensors refuses views and shared storage.
    copies = {k: v.detach().contiguous().clone() for k, v in flat.items()}
    replace_into(os.path.join(out, "state.safetensors"), lambda p: save_file(copies, p))

    def write_names(p):
        with open(p, "w") as f:
            json.dump(list(flat.keys()), f)

    replace_into(os.path.join(out, "names.json"), write_names)

    def write_deflated(p):
        with zipfile.ZipFile(state_bin) as src, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))

    replace_into(os.path.join(out, "state_deflated.bin"), write_deflated)

    def write_evil(p):
        # pickle.dumps only records (os.system, args); nothing runs here.
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
            z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
            z.writestr("evil/byteorder", "little")
            z.writestr("evil/data/0", b"\0" * 4)
            z.writestr("evil/version", "3\n")

    replace_into(os.path.join(out, "evil.bin"), write_evil)


if __name__ == "__main__":
    main()
