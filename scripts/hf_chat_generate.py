"""Greedy chat replies by transformers (the oracle for `octet generate --chat` and
`octet chat`).

Usage: hf_chat_generate.py MODEL_DIR CONVERSATIONS_JSON MAX_NEW_TOKENS END_OF_TURN

CONVERSATIONS_JSON is a JSON list of conversations, each a list of {"role", "content"}
messages. Each is rendered with `apply_chat_template(add_generation_prompt=True,
tokenize=True)` and continued by `generate` with do_sample=False in f32 with eager attention.
Generation stops at the generation_config's EOS ids, the tokenizer's EOS and the END_OF_TURN
token; ids past the tokenizer's vocabulary (a padded embedding) are suppressed, as octet does.
Prints a JSON list of {"prompt_ids", "ids", "text"}: the new ids (a stop id, when generated,
included and last) and their text without the stop id.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    model_dir, conversations, max_new, end_of_turn = sys.argv[1:5]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos += [t for t in (tok.eos_token_id, tok.convert_tokens_to_ids(end_of_turn)) if t is not None]
    vocab = model.get_input_embeddings().weight.shape[0]
    out = []
    for messages in json.loads(conversations):
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompt = torch.tensor([list(ids)], dtype=torch.long)
        with torch.no_grad():
            gen = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=int(max_new),
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
                suppress_tokens=list(range(len(tok), vocab)) or None,
            )
        new = gen[0, prompt.shape[1]:].tolist()
        body = new[:-1] if new and new[-1] in eos else new
        out.append({"prompt_ids": list(ids), "ids": new, "text": tok.decode(body)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
