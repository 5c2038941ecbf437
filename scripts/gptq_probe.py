"""Probe: does GPTQ-style error feedback make 8-bit blockwise storage indistinguishable?

Quantizes every Linear weight of a GGUF model (and, through the tied LM head, its embedding)
in blocks of BLOCK along the input dimension with one absmax per block, double-quantized as
octet's --double-quant stores it (mean removed, 8-bit dynamic code in groups of 256), and
compares perplexity against the unquantized model:
- rtn: each value rounded to the nearest code level;
- gptq: columns quantized in order, each one's error spread over the columns not yet
  quantized through the inverse Hessian H = X^T X of the layer's inputs, collected from
  calibration tokens of the unquantized model (1% dampening; Frantar et al., 2022).
Codes: `linear` (k/127, as llama.cpp's Q8_0) and `dynamic` (bitsandbytes' signed code).

Perplexity: disjoint windows of 512 tokens over the first 20,480 tokens of each text.
Calibration: CALIB_TOKENS tokens of CALIB_TEXT starting at token CALIB_START, which should be
outside every evaluated span.

Usage: gptq_probe.py GGUF CALIB_TEXT TEXT [TEXT ...] [--calib-start 40000]
       [--calib-tokens 2048] [--block 64] [--codes linear,dynamic] [--methods rtn,gptq]
Prints one line per (method, code): the perplexity change on each text.
"""
import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

WINDOW = 512
MAX_TOKENS = 20_480
CODES = {
    "linear": torch.arange(-127, 128, dtype=torch.float64) / 127,
    "dynamic": bnbf.create_dynamic_map(signed=True).double(),
}


def nearest(x, code):
    mid = (code[1:] + code[:-1]) / 2
    return code[torch.bucketize(x, mid)]


def double_quantized(absmax):
    """The block scales as octet's --double-quant stores and reads them back."""
    offset = absmax.mean()
    r = absmax - offset
    pad = (-r.numel()) % 256
    groups = torch.cat([r, r.new_zeros(pad)]).view(-1, 256)
    scale = groups.abs().amax(1, keepdim=True).clamp_min(1e-30)
    q = nearest((groups / scale).flatten(), CODES["dynamic"]).view(-1, 256) * scale
    return (q.flatten()[: r.numel()] + offset).clamp_min(1e-30)


def quantize(w, h, code, block, gptq):
    """w [out, in] rounded blockwise along `in`; with `gptq`, with error feedback through h."""
    w = w.double().clone()
    n_in = w.shape[1]
    if gptq:
        h = h.clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        h += 0.01 * torch.mean(torch.diag(h)) * torch.eye(n_in, dtype=h.dtype)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        wb = w[:, b0:b1].clone()
        scale = double_quantized(wb.abs().amax(1))
        err = torch.zeros_like(wb)
        for j in range(b1 - b0):
            col = nearest((wb[:, j] / scale).clamp(-1, 1), code) * scale
            q[:, b0 + j] = col
            if gptq:
                e = (wb[:, j] - col) / hinv[b0 + j, b0 + j]
                wb[:, j:] -= e[:, None] * hinv[b0 + j, b0 + j : b1][None, :]
                err[:, j] = e
        if gptq:
            w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q.float()


@torch.no_grad()
def nll(model, ids):
    total, count = 0.0, 0
    for start in range(0, ids.numel(), WINDOW):
        chunk = ids[start : start + WINDOW]
        if chunk.numel() < 2:
            continue
        logits = model(input_ids=chunk[None]).logits[0]
        total += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("calib_text")
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--calib-start", type=int, default=40_000)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--codes", default="linear,dynamic")
    ap.add_argument("--methods", default="rtn,gptq")
    a = ap.parse_args()
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(a.gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    encode = lambda path: tok(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    texts = {p: torch.tensor(encode(p)[:MAX_TOKENS]) for p in a.texts}
    calib_ids = encode(a.calib_text)[a.calib_start : a.calib_start + a.calib_tokens]
    if len(calib_ids) < a.calib_tokens:
        raise SystemExit(f"{a.calib_text}: fewer than {a.calib_start + a.calib_tokens} tokens")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    hessians = {}

    def collect(name):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    hooks = [m.register_forward_hook(collect(n)) for n, m in linears.items()]
    calib = torch.tensor(calib_ids)
    with torch.no_grad():
        for start in range(0, calib.numel(), WINDOW):
            model(input_ids=calib[start : start + WINDOW][None])
    for h in hooks:
        h.remove()
    base = {p: nll(model, ids) for p, ids in texts.items()}
    print("f32 nll: " + ", ".join(f"{os.path.basename(p)} {v:.6f}" for p, v in base.items()), flush=True)
    for method in a.methods.split(","):
        for code in a.codes.split(","):
            with torch.no_grad():
                for n, m in linears.items():
                    m.weight.copy_(quantize(original[n], hessians[n], CODES[code], a.block, method == "gptq"))
            diffs = ", ".join(
                f"{os.path.basename(p)} {100 * (math.exp(nll(model, ids) - base[p]) - 1):+.3f}%"
                for p, ids in texts.items()
            )
            print(f"{method} {code}/{a.block} double-quantized scales: {diffs}", flush=True)
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(original[n])


if __name__ == "__main__":
    main()
