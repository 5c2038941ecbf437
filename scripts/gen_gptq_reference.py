"""GPTQ reference for `octet convert --calibrate`, computed without octet (transformers,
bitsandbytes, float64).

Usage: gen_gptq_reference.py OUT_DIR LLAMA_DIR GPT2_DIR

Writes OUT_DIR/calib.txt (fixed-seed English-like text) and, for each model (a tiny Llama with
a tied embedding, a tiny GPT-2 whose Conv1D weights are stored [in, out]), OUT_DIR/<name>/: a
copy of the model with a byte-level tokenizer, and gptq.safetensors holding, for every 8-bit
weight, the code value of each element (f32, stored layout) after this procedure:

- Scheme: the linear code (k/127), blocks of 64 elements over the stored row-major weight,
  each block's absmax double-quantized by bitsandbytes (`quantize_blockwise(absmax - mean,
  blocksize=256)`, de-quantized, negatives raised to 0). GPTQ keeps these scales.
- Calibration: the text's tokens in rows of min(512, context), each through the model alone.
  Before calibrating, every 8-bit weight (the token table included) is rounded to nearest
  with plain f32 absmax, as a model loaded for calibration holds it.
- Block by block (Frantar et al., 2022): hooks add XᵀX of each of the block's Linear inputs;
  each weight (as [out, in]) is rounded column by column from its float original, each
  column's error spread over the later columns through U, the upper Cholesky factor of
  (H + damp·mean(diag H)·I)⁻¹ (a zero diagonal entry first set to 1); the rounded weights
  replace the block's before the next block is calibrated. The dampening is
  max(1%, in_features / calibration tokens) of the mean diagonal.
- Last, the tied token table is rounded against the LM head's inputs (the final norm output).

Also writes nearest.safetensors: round-to-nearest code values with the same scales.
"""
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

BLOCK = 64
ROW_TOKENS = 512
CODE = torch.cat([torch.tensor([-1.0]), torch.arange(-127, 128, dtype=torch.float32) / 127])
MIDS = ((CODE[1:].double() + CODE[:-1].double()) / 2)

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were their one all we can her has there been if more when will "
    "would who so no river city church king war house land water early century great north south "
    "built made called known several between during under after before against through"
).split()


def calibration_text():
    g = torch.Generator().manual_seed(20261205)
    idx = torch.randint(0, len(WORDS), (1500,), generator=g).tolist()
    sentences, cur = [], []
    for i, w in enumerate(idx):
        cur.append(WORDS[w])
        if len(cur) >= 8 and (i % 11 == 0):
            s = " ".join(cur)
            sentences.append(s[0].upper() + s[1:] + ".")
            cur = []
    return " ".join(sentences) + "\n"


def nearest(x):
    """Index into CODE of the value nearest to x (ties to the lower index)."""
    return torch.bucketize(x.double(), MIDS, right=False)


def plain_scales(w):
    flat = w.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK)
    return blocks.abs().amax(1)


def double_quantized(absmax):
    offset = absmax.mean()
    q, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    deq = bnbf.dequantize_blockwise(q, state2)
    deq += offset
    return deq.clamp_min(0.0)


def element_scales(absmax, shape):
    n = shape[0] * shape[1]
    idx = torch.arange(n) // BLOCK
    return absmax[idx].view(shape).double()


def rtn_values(w_stored, scales_stored):
    s = scales_stored
    x = torch.where(s > 0, w_stored.double() / torch.where(s > 0, s, 1), 0).clamp(-1, 1)
    return CODE[nearest(x)].double()


def gptq_values(w_oi, s_oi, h, tokens):
    """Code values of w [out, in] rounded with error feedback through h [in, in]."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    damp = max(0.01, h.shape[0] / tokens)
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = w_oi.double().clone()
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        s = s_oi[:, j]
        x = torch.where(s > 0, w[:, j] / torch.where(s > 0, s, 1), 0).clamp(-1, 1)
        v = CODE[nearest(x)].double()
        out[:, j] = v
        e = (w[:, j] - v * s) / u[j, j]
        w[:, j + 1:] -= e[:, None] * u[j, j + 1:][None, :]
    return out


class Spec:
    def __init__(self, model, kind):
        self.model, self.kind = model, kind
        if kind == "llama":
            self.layers = model.model.layers
            self.table = ("model.embed_tokens.weight", model.model.embed_tokens)
            self.subs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            self.prefix = "model.layers"
        else:
            self.layers = model.transformer.h
            self.table = ("transformer.wte.weight", model.transformer.wte)
            self.subs = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
            self.prefix = "transformer.h"

    def modules(self, i):
        layer = self.layers[i]
        for s in self.subs:
            yield f"{self.prefix}.{i}.{s}.weight", layer.get_submodule(s)

    def transposed(self):
        return self.kind == "gpt2"  # Conv1D stores [in, out]


def calibrate(model_dir, kind, text, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, f), out_dir)
    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        sys.path.insert(0, os.path.dirname(__file__))
        from make_byte_tokenizer import build
        build().save(os.path.join(out_dir, "tokenizer.json"))
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    spec = Spec(model, kind)
    ctx = model.config.max_position_embeddings
    ids = tok.encode(text).ids[:2048]
    row = min(ROW_TOKENS, ctx)
    rows = [torch.tensor([ids[k:k + row]]) for k in range(0, len(ids), row)]

    named = [spec.table] + [m for i in range(len(spec.layers)) for m in spec.modules(i)]
    original = {n: m.weight.detach().double().clone() for n, m in named}
    dq_scales = {n: element_scales(double_quantized(plain_scales(w)), w.shape)
                 for n, w in original.items()}
    gptq, rtn = {}, {}
    with torch.no_grad():
        for n, m in named:
            m.weight.copy_((rtn_values(original[n], element_scales(plain_scales(original[n]),
                                                                   original[n].shape))
                            * element_scales(plain_scales(original[n]), original[n].shape)).float())
            rtn[n] = rtn_values(original[n], dq_scales[n])

    def run_rows():
        with torch.no_grad():
            for r in rows:
                model(input_ids=r)

    def record(targets):
        hs = {n: None for n, _ in targets}
        hooks = []
        for n, m in targets:
            def hook(mod, args, n=n):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                xtx = (x.T @ x).double()
                hs[n] = xtx if hs[n] is None else hs[n] + xtx
            hooks.append(m.register_forward_pre_hook(hook))
        run_rows()
        for h in hooks:
            h.remove()
        return hs

    def round_into(n, m, h):
        w, s = original[n], dq_scales[n]
        if spec.transposed() and n != spec.table[0]:
            v = gptq_values(w.T, s.T, h, len(ids)).T
        else:
            v = gptq_values(w, s, h, len(ids))
        gptq[n] = v
        with torch.no_grad():
            m.weight.copy_((v * s).float())

    for i in range(len(spec.layers)):
        targets = list(spec.modules(i))
        hs = record(targets)
        for n, m in targets:
            round_into(n, m, hs[n])
    head = model.get_output_embeddings()
    hs = record([("head", head)])
    gptq[spec.table[0]] = gptq_values(original[spec.table[0]], dq_scales[spec.table[0]],
                                      hs["head"], len(ids))
    save_file({n: v.float().contiguous() for n, v in gptq.items()},
              os.path.join(out_dir, "gptq.safetensors"))
    save_file({n: v.float().contiguous() for n, v in rtn.items()},
              os.path.join(out_dir, "nearest.safetensors"))
    changed = {n: (gptq[n] != rtn[n]).float().mean().item() for n in gptq}
    print(f"{kind}: {len(ids)} tokens in {len(rows)} rows; GPTQ changed "
          f"{100 * min(changed.values()):.1f}%…{100 * max(changed.values()):.1f}% of codes")


def main(out, llama_dir, gpt2_dir):
    os.makedirs(out, exist_ok=True)
    text = calibration_text()
    with open(os.path.join(out, "calib.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    calibrate(llama_dir, "llama", text, os.path.join(out, "llama"))
    calibrate(gpt2_dir, "gpt2", text, os.path.join(out, "gpt2"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
