"""bitsandbytes' Adam8bit on a CUDA device, for octet's CUDA-marked comparison test.

Usage: bnb_cuda_adam8bit.py OUT.safetensors

Writes `init` [3, 4000] f32, `grad.1`..`grad.5`, and after the fifth step `param`, `state1`,
`state2`, `absmax1`, `absmax2` (lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay; seed 7).
Exits with status 3 and a one-line reason when bitsandbytes or a CUDA device is missing.
"""
import sys

import torch

STEPS = 5


def main(out_path):
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        print(f"bitsandbytes is not importable: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(3)
    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        sys.exit(3)
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    init = (torch.randn(3, 4000, generator=gen) * 0.02).float()
    grads = [(torch.randn(3, 4000, generator=gen) * 10.0 ** (t - 2)).float() for t in range(STEPS)]
    p = torch.nn.Parameter(init.clone().cuda())
    opt = bnb.optim.Adam8bit([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for g in grads:
        p.grad = g.cuda()
        opt.step()
    st = opt.state[p]
    tensors = {"init": init, "param": p.detach().cpu().contiguous()}
    for t, g in enumerate(grads, start=1):
        tensors[f"grad.{t}"] = g
    for key in ("state1", "state2", "absmax1", "absmax2"):
        tensors[key] = st[key].detach().cpu().contiguous()
    save_file(tensors, out_path, metadata={"bitsandbytes": bnb.__version__})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bnb_cuda_adam8bit.py OUT.safetensors")
    main(sys.argv[1])
