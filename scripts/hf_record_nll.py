"""Negative log-likelihood of chat records under transformers (the oracle for `octet eval` on
chat data).

Usage: hf_record_nll.py MODEL_DIR CONVERSATIONS_JSON

CONVERSATIONS_JSON is a JSON list of conversations, each a list of {"role", "content"}
messages. Each is rendered by the tokenizer's chat template with
`apply_chat_template(tokenize=True, return_assistant_tokens_mask=True)` (the template marks
its assistant turns with {% generation %}) and run alone through the model in f32 with eager
attention. Prints {"assistant": {"nll_sum", "tokens"}, "all": {"nll_sum", "tokens"}}: the
summed next-token NLL over the assistant-masked tokens, and over every token after the first.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    model_dir, conversations = sys.argv[1:3]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    sums = {"assistant": [0.0, 0], "all": [0.0, 0]}
    for messages in json.loads(conversations):
        enc = tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
        mask = torch.tensor(enc["assistant_masks"], dtype=torch.bool)
        with torch.no_grad():
            logits = model(ids).logits[0]
        nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").double()
        for key, keep in (("assistant", mask[1:]), ("all", torch.ones_like(mask[1:]))):
            sums[key][0] += nll[keep].sum().item()
            sums[key][1] += int(keep.sum())
    print(json.dumps({k: {"nll_sum": v[0], "tokens": v[1]} for k, v in sums.items()}))


if __name__ == "__main__":
    main()
