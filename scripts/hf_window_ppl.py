"""Perplexity of a Hugging Face causal LM over given token ids, in non-overlapping windows
(the oracle for tests/smollm2.rs).

Usage: hf_window_ppl.py MODEL IDS.safetensors WINDOW [GGUF_FILE]

IDS.safetensors holds `input_ids` (int64 [N]). The ids are cut into consecutive windows of
WINDOW tokens (the last may be shorter); each window predicts its own tokens 2..len from the
ones before, with no BOS and no context carried across windows.
ppl = exp(sum of NLLs / number of predicted tokens), all in f32.
MODEL is a model folder; with GGUF_FILE, MODEL is the folder holding it and transformers'
own GGUF loader reads the weights (a second opinion on the de-quantization and q/k order).
Prints one JSON object: {"ppl": ..., "nll": ..., "tokens": ...}.
"""
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


@torch.no_grad()
def window_ppl(model, ids, window):
    """{"ppl", "nll", "tokens"} of `model` over `ids` (int64 [N]) in disjoint windows."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel(), window):
        chunk = ids[start : start + window]
        if chunk.numel() < 2:
            continue
        logits = model(input_ids=chunk.unsqueeze(0)).logits[0].float()
        nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return {"ppl": math.exp(nll / count), "nll": nll, "tokens": count}


def main():
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir, ids_path, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kwargs = {"gguf_file": sys.argv[4]} if len(sys.argv) > 4 else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()
    ids = load_file(ids_path)["input_ids"].long().flatten()
    print(json.dumps(window_ppl(model, ids, window)))


if __name__ == "__main__":
    main()
