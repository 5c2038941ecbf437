"""Reference token ids for octet's tokenizer tests.

Usage: gen_tokenizer_vectors.py TOKENIZER_DIR OUT_JSON

TOKENIZER_DIR holds the GPT-2 BPE (vocab.json, merges.txt, tokenizer.json), as written by
scripts/make_gpt2_tokenizer.py. The ids come from transformers' `GPT2TokenizerFast` built from
vocab.json + merges.txt (no special tokens added), and are checked against python `tokenizers`
loading tokenizer.json, so both of octet's loading paths have an oracle.
Writes OUT_JSON as [{"text": ..., "ids": [...]}, ...]. Nothing random is involved.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tokenizers import Tokenizer  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2TokenizerFast  # noqa: E402

TEXTS = [
    "Hello world",
    " Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand  double  spaces",
    "whitespace runs:      end",
    "\n\n\n",
    "digits 0 7 42 1234567890 3.14159 1,000,000",
    "unicode: ünïcödé naïve café Ångström ß",
    "CJK: 東京は日本の首都です。 中文测试",
    "emoji: 🙂 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "Cyrillic Привет мир, Greek Καλημέρα, Arabic مرحبا",
    "code: fn main() { println!(\"{}\", x + 1); } // it's",
    "contractions: I'm you're he'll they've we'd isn't",
    "first document<|endoftext|>second document",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "zero\u200bwidth and combining e\u0301",
]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tok_dir, out = sys.argv[1], sys.argv[2]
    vocab, merges = os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt")
    # transformers 5 takes the file paths as `vocab`/`merges`; 4.x named them `*_file`. An
    # unknown keyword is swallowed silently (leaving an empty vocabulary), hence the check below.
    if int(transformers.__version__.split(".")[0]) >= 5:
        fast = GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        fast = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    if fast.encode("Hello world", add_special_tokens=False) != [15496, 995]:
        sys.exit("GPT2TokenizerFast did not load the GPT-2 vocabulary")
    raw = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    vectors = []
    for text in TEXTS:
        ids = fast.encode(text, add_special_tokens=False)
        other = raw.encode(text, add_special_tokens=False).ids
        if ids != other:
            sys.exit(f"transformers and tokenizer.json disagree on {text!r}: {ids} vs {other}")
        vectors.append({"text": text, "ids": ids})
    assert vectors[0]["ids"] == [15496, 995], vectors[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(v, ensure_ascii=False) for v in vectors) + "\n]\n")
    os.replace(tmp, out)
    print(f"wrote {len(vectors)} vectors to {out}")


if __name__ == "__main__":
    main()
