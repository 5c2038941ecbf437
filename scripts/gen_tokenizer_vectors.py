"""Reference token ids for octet's tokenizer tests.

Usage: gen_tokenizer_vectors.py TOKENIZER_DIR OUT_JSON
       gen_tokenizer_vectors.py --gguf GGUF_FILE OUT_JSON

TOKENIZER_DIR holds the GPT-2 BPE (vocab.json, merges.txt, tokenizer.json), as written by
scripts/make_gpt2_tokenizer.py. The ids come from transformers' `GPT2TokenizerFast` built from
vocab.json + merges.txt (no special tokens added), and are checked against python `tokenizers`
loading tokenizer.json, so both of octet's loading paths have an oracle.
Writes OUT_JSON as [{"text": ..., "ids": [...]}, ...].

With --gguf, the tokenizer is the one transformers builds from the GGUF's metadata
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), for a byte-level BPE GGUF such as
SmolLM2's; OUT_JSON is {"gguf": name, "eos_token_id": .., "bos_token_id": .., "vectors": [..]}
over TEXTS + GGUF_TEXTS. transformers (5.24) ignores `tokenizer.ggml.pre` values it has no
regex for, among them "smollm", for which llama.cpp first splits off every \p{N} character
(llama-vocab.cpp, the STARCODER/SMOLLM/... case) as SmolLM2's own tokenizer.json does with a
`Digits(individual_digits=True)` pre-tokenizer; that step is put back here, and how many
strings it changes is recorded as "digit_split_changes". Nothing random is involved.
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

# More for a GGUF vocabulary (SmolLM2's): its control tokens, numbers of every kind (its
# `tokenizer.ggml.pre` is "smollm": each digit is split off), Windows newlines, real prose.
GGUF_TEXTS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|><|endoftext|>text<|im_end|>",
    "<repo_name>octet<file_sep>src/lib.rs",
    "born 23 April 1564, died 1616; 37 plays, 154 sonnets",
    "  12  345\t6789 0.5 -42 +1e10 1,234,567.89 007",
    "x² + y³ = z¹ ½ ¾ ⅓ Ⅻ ١٢٣ ४२ ４２ ①②",
    "DON'T I'M You'Re o'clock rock'n'roll 'quoted' \"double\"",
    "line one\r\nline two\r\n\r\n\ttabbed\n    indented",
    "trailing whitespace \n \n\t ",
    "SHAKESPEARE, WILLIAM (1564-1616), English poet and dramatist, the greatest of all.",
    "Æsop's fables; œuvre; straße; İstanbul; ǅ; ﬁne ligature",
    "日本語のテキスト、한국어 텍스트, ภาษาไทย, עִבְרִית",
    "emoji runs: 🙂🙂🙂 🏳️‍🌈 ❤️ 🧑🏿‍💻 and text",
    "a" * 40 + " " + "ab" * 20,
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "    def f(x):\n        return x ** 2  # square\n",
]


def write(out, text):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)


# llama.cpp pre-tokenizer types that split off each digit before GPT-2's regex.
DIGIT_SPLIT_PRE = {
    "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
}


def gguf_main(gguf_file, out):
    import copy

    from gguf import GGUFReader
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d, name = os.path.split(os.path.abspath(gguf_file))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    field = GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    pre = bytes(field.parts[-1]).decode() if field is not None else "default"
    plain = copy.deepcopy(tok.backend_tokenizer)
    if pre in DIGIT_SPLIT_PRE:
        if pre in GGUF_PRE_TOKENIZER_SPLITS:
            sys.exit(f"transformers now has its own split for {pre!r}: drop the fix-up here")
        bl = tok.backend_tokenizer.pre_tokenizer
        if not isinstance(bl, pre_tokenizers.ByteLevel):
            sys.exit(f"expected a ByteLevel pre-tokenizer from transformers, got {bl}")
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), bl]
        )
    vectors, changes = [], 0
    for text in TEXTS + GGUF_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        changes += plain.encode(text, add_special_tokens=False).ids != ids
        # Byte-level BPE is lossless; a reference that is not would be a wrong reference.
        back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            sys.exit(f"transformers does not round-trip {text!r}: {back!r}")
        vectors.append({"text": text, "ids": ids})
    if tok.eos_token_id is None or tok.bos_token_id is None:
        sys.exit(f"{name}: transformers found no EOS/BOS token")
    doc = {
        "gguf": name,
        "pre": pre,
        "digit_split_changes": changes,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "vectors": vectors,
    }
    body = ",\n".join(json.dumps(v, ensure_ascii=False) for v in vectors)
    head = json.dumps({k: v for k, v in doc.items() if k != "vectors"}, ensure_ascii=False)
    write(out, head[:-1] + ', "vectors": [\n' + body + "\n]}\n")
    print(f"wrote {len(vectors)} vectors to {out} ({changes} changed by the digit split)")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--gguf":
        return gguf_main(sys.argv[2], sys.argv[3])
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
    write(out, "[\n" + ",\n".join(json.dumps(v, ensure_ascii=False) for v in vectors) + "\n]\n")
    print(f"wrote {len(vectors)} vectors to {out}")


if __name__ == "__main__":
    main()
