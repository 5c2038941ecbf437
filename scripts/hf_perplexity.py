"""Sliding-window perplexity of a Hugging Face causal LM (the oracle for `octet eval`).

Usage: hf_perplexity.py MODEL_DIR TEXT_FILE CTX STRIDE [--max-tokens K] [--adapter DIR]
                        [--kl-against OTHER_DIR]

The algorithm of the "Perplexity of fixed-length models" guide: the whole file is tokenized
with MODEL_DIR/tokenizer.json (no BOS), windows of CTX tokens start every STRIDE tokens, and
each window scores only the tokens no earlier window scored (labels -100 on the overlap).
Unlike the guide, which multiplies each window's mean loss by a token count that is one too
small whenever windows overlap, the per-token losses are summed exactly:
ppl = exp(sum of scored-token NLLs / number of scored tokens). Prints one JSON object.

With --kl-against, OTHER_DIR's model runs on the same windows and the object also holds
"kl": the mean and largest KL(MODEL ‖ OTHER) of the next-token distributions at the scored
tokens (in f64), the share of them where both models rank the same token first, and their count.
"""
import argparse
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("text_file")
    p.add_argument("ctx", type=int)
    p.add_argument("stride", type=int)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--kl-against", default=None)
    a = p.parse_args()

    tok = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
    with open(a.text_file, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=False).ids
    if a.max_tokens is not None:
        ids = ids[: a.max_tokens]
    ids = torch.tensor([ids], dtype=torch.long)

    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    other = None
    if a.kl_against:
        other = AutoModelForCausalLM.from_pretrained(
            a.kl_against, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    kl_sum, kl_max, agree, kl_tokens = 0.0, 0.0, 0, 0

    seq_len = ids.size(1)
    nll_sum, n_scored, prev_end, windows = 0.0, 0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq_len, a.stride):
            end = min(begin + a.ctx, seq_len)
            trg_len = end - prev_end
            window = ids[:, begin:end]
            labels = window.clone()
            labels[:, :-trg_len] = -100
            logits = model(input_ids=window).logits.float()
            pred = logits[:, :-1].reshape(-1, logits.size(-1))
            target = labels[:, 1:].reshape(-1)
            nll_sum += F.cross_entropy(pred, target, ignore_index=-100, reduction="sum").item()
            n_scored += int((target != -100).sum())
            if other is not None:
                scored = target != -100
                lp = F.log_softmax(pred.double(), -1)[scored]
                lq = F.log_softmax(other(input_ids=window).logits[:, :-1].reshape(pred.shape).double(), -1)[scored]
                kl = (lp.exp() * (lp - lq)).sum(-1)
                kl_sum += kl.sum().item()
                kl_max = max(kl_max, kl.max().item())
                agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                kl_tokens += kl.numel()
            windows += 1
            prev_end = end
            if end == seq_len:
                break
    nll = nll_sum / n_scored
    out = {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": n_scored,
        "ctx": a.ctx,
        "stride": a.stride,
        "windows": windows,
    }
    if other is not None:
        out["kl"] = {
            "kl_mean": kl_sum / kl_tokens,
            "kl_max": kl_max,
            "top1_agreement": agree / kl_tokens,
            "tokens": kl_tokens,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
