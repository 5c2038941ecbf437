"""transformers' ids and text for a tokenizer folder (or a GGUF's tokenizer) on given strings.

Usage: hf_tokenize.py DIR TEXTS_JSON [GGUF_NAME]

Loads `AutoTokenizer.from_pretrained(DIR)` (with `gguf_file=GGUF_NAME` when given), reads
TEXTS_JSON (a JSON list of strings) and prints JSON:
{"bos_token_id", "eos_token_id", "vocab_size", "chat_template",
 "vectors": [{"text", "ids", "ids_special", "decoded", "decoded_special"}]}
where `ids` / `ids_special` are `encode(text, add_special_tokens=False / True)` and
`decoded` / `decoded_special` their `decode` with the tokenizer's own settings.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tokenize_all(tok, texts):
    vectors = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        ids_special = tok.encode(text, add_special_tokens=True)
        vectors.append({
            "text": text,
            "ids": ids,
            "ids_special": ids_special,
            "decoded": tok.decode(ids),
            "decoded_special": tok.decode(ids_special),
        })
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
        "vectors": vectors,
    }


def load(directory, gguf_name=None):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if gguf_name:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_name)
    return AutoTokenizer.from_pretrained(directory)


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    with open(sys.argv[2], encoding="utf-8") as f:
        texts = json.load(f)
    tok = load(sys.argv[1], sys.argv[3] if len(sys.argv) == 4 else None)
    json.dump(tokenize_all(tok, texts), sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
