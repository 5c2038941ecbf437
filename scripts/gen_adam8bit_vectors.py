"""Writes optimizer test vectors: bitsandbytes' Adam8bit and torch's AdamW, on CPU, fixed seed.

Usage: gen_adam8bit_vectors.py OUT.safetensors

Five parameters: [5000], [300, 70], [4096], [33000] (8-bit state; all but [4096] end in a
partial 256-element block, and [33000] is large enough for libtorch to split its loops across
threads) and [64, 33] (fewer than 4096 elements: f32 state). Each gets 12 seeded gradients of
varied scale; step 1 zeroes each parameter's first 256 gradients (an all-zero state block),
step 3 zeroes a random 5%, step 7 is heavy-tailed.

Keys (per parameter pK, step t = 1..12):
  pK.init, pK.grad.t                                   inputs
  bnb.pK.param.t, bnb.pK.state1.t, bnb.pK.state2.t     after bnb Adam8bit step t
  bnb.pK.absmax1.t, bnb.pK.absmax2.t                   (8-bit parameters only)
  adamw.pK.param.t, adamw.pK.exp_avg, adamw.pK.exp_avg_sq   torch.optim.AdamW (foreach=False)
  config.lr, config.beta1, config.beta2, config.eps, config.weight_decay   (f64 scalars)
"""
import sys

import torch
import bitsandbytes as bnb
from safetensors.torch import save_file

SHAPES = [(5000,), (300, 70), (64, 33), (4096,), (33000,)]
SCALES = [1e-3, 1.0, 0.1, 10.0, 1e-2, 1.0, 0.3, 3.0, 1e-4, 0.05, 1.0, 0.02]
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.995), 1e-8, 0.01


def gradients(gen, shape):
    out = []
    for t, scale in enumerate(SCALES, start=1):
        g = torch.randn(shape, generator=gen) * scale
        flat = g.view(-1)
        if t == 1:
            flat[:256] = 0.0
        if t == 3:
            flat[torch.rand(flat.numel(), generator=gen) < 0.05] = 0.0
        if t == 7:
            # Student-t with 2 degrees of freedom: a few very large entries.
            chi2 = (torch.randn((2,) + tuple(shape), generator=gen) ** 2).mean(0)
            g = g / chi2.sqrt().clamp_min(1e-3)
        out.append(g.float().contiguous())
    return out


def main(out_path):
    gen = torch.Generator().manual_seed(20250611)
    inits = [(torch.randn(s, generator=gen) * 0.02).float() for s in SHAPES]
    grads = [gradients(gen, s) for s in SHAPES]
    tensors = {
        "config.lr": torch.tensor([LR], dtype=torch.float64),
        "config.beta1": torch.tensor([BETAS[0]], dtype=torch.float64),
        "config.beta2": torch.tensor([BETAS[1]], dtype=torch.float64),
        "config.eps": torch.tensor([EPS], dtype=torch.float64),
        "config.weight_decay": torch.tensor([WD], dtype=torch.float64),
    }
    for k, (init, gs) in enumerate(zip(inits, grads)):
        tensors[f"p{k}.init"] = init.clone()
        for t, g in enumerate(gs, start=1):
            tensors[f"p{k}.grad.{t}"] = g.clone()

    params = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = bnb.optim.Adam8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for t in range(1, len(SCALES) + 1):
        for p, gs in zip(params, grads):
            p.grad = gs[t - 1].clone()
        opt.step()
        for k, p in enumerate(params):
            st = opt.state[p]
            assert st["step"] == t
            tensors[f"bnb.p{k}.param.{t}"] = p.detach().clone()
            for key in ("state1", "state2", "absmax1", "absmax2"):
                if key in st:
                    tensors[f"bnb.p{k}.{key}.{t}"] = st[key].detach().clone().contiguous()

    params = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for t in range(1, len(SCALES) + 1):
        for p, gs in zip(params, grads):
            p.grad = gs[t - 1].clone()
        opt.step()
        for k, p in enumerate(params):
            tensors[f"adamw.p{k}.param.{t}"] = p.detach().clone()
    for k, p in enumerate(params):
        tensors[f"adamw.p{k}.exp_avg"] = opt.state[p]["exp_avg"].clone()
        tensors[f"adamw.p{k}.exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()

    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__}
    save_file(tensors, out_path, metadata=meta)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gen_adam8bit_vectors.py OUT.safetensors")
    main(sys.argv[1])
