"""Writes GGUF files of the tiny GPT-NeoX with llama.cpp's own converter, the oracle for octet's
`gptneox` export (names, metadata, the q/k/v rows regrouped per part, tensor bytes).

Usage: gen_gguf_export_neox.py OUT_DIR NEOX_DIR LLAMA_CPP_DIR

NEOX_DIR is fixtures/generated/tiny_gpt_neox/hf_safetensors (hidden 64, 4 heads, rotary 0.25,
rope base 5000, vocabulary 301 over a 257-token byte-level BPE); LLAMA_CPP_DIR holds the converter
as scripts/fetch_llama_cpp_converter.sh fetches it. Two things are patched around the converter,
nothing in it: its GPT-NeoX code reads `rotary_pct` from the config as transformers parses it, and
transformers 5 moves that key into `rope_parameters.partial_rotary_factor`, so the parsed config is
given `rotary_pct` back from there; and the tiny tokenizer's unknown pre-tokenizer hash is given
the name "gpt2" (see gen_tiny_decoders_gguf.py). What the converter drops: the rope base (llama.cpp
then assumes 10000).

  OUT_DIR/gpt_neox.f16.gguf    --outtype f16
  OUT_DIR/gpt_neox.q8_0.gguf   --outtype q8_0
"""
import os
import subprocess
import sys

from gen_tiny_decoders_gguf import WRAPPER

ROTARY_PCT = """
from conversion.base import ModelBase
_load = ModelBase.load_hparams
def load_hparams(dir_model, is_mistral_format):
    c = _load(dir_model, is_mistral_format)
    c.setdefault("rotary_pct", (c.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    return c
ModelBase.load_hparams = staticmethod(load_hparams)
"""
PATCHED = WRAPPER.replace("sys.argv[0] = root", ROTARY_PCT + "sys.argv[0] = root")
assert PATCHED != WRAPPER


def convert(llama_cpp, src, out, outtype):
    cmd = [sys.executable, "-c", PATCHED, llama_cpp, "gpt2", src, "--outtype", outtype, "--outfile", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        sys.exit(f"llama.cpp's converter failed on {src} ({outtype}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


def main(out, neox, llama_cpp):
    os.makedirs(out, exist_ok=True)
    for outtype in ("f16", "q8_0"):
        path = os.path.join(out, f"gpt_neox.{outtype}.gguf")
        convert(llama_cpp, neox, path, outtype)
        print(f"  {path}: {os.path.getsize(path) / 1e3:.0f} kB")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
