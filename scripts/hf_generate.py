"""Greedy continuation of token ids by a Hugging Face causal LM (the oracle for
`octet generate`).

Usage: hf_generate.py MODEL_DIR IDS_JSON MAX_NEW_TOKENS [--no-eos] [--repetition-penalty R]
       [--no-cache]

IDS_JSON is a JSON list of equal-length lists of prompt ids. Runs `generate` with
do_sample=False in f32 with eager attention and prints a JSON list of the new ids of each row
(an EOS, when generated, is included and ends the row). --no-eos disables the
generation_config's EOS so exactly MAX_NEW_TOKENS come back.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("ids_json")
    p.add_argument("max_new_tokens", type=int)
    p.add_argument("--no-eos", action="store_true")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-cache", action="store_true")
    a = p.parse_args()

    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    ids = torch.tensor(json.loads(a.ids_json), dtype=torch.long)
    if a.no_eos:
        model.generation_config.eos_token_id = None
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=a.max_new_tokens,
            do_sample=False,
            repetition_penalty=a.repetition_penalty,
            use_cache=not a.no_cache,
            pad_token_id=0,
        )
    rows = []
    for row in out[:, ids.size(1):].tolist():
        # Rows that ended early are padded after their EOS; drop the padding.
        new = []
        for t in row:
            new.append(t)
            if t in eos:
                break
        rows.append(new)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
