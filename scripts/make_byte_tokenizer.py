"""Writes a byte-level tokenizer.json with 257 tokens (the 256 byte symbols + <|endoftext|>),
so the tiny random test models (vocab 301) can be trained and evaluated on real text.

Usage: make_byte_tokenizer.py DIR [DIR ...]
"""
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def build():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def main():
    tok = build()
    assert tok.decode(tok.encode("Hello, wörld!").ids) == "Hello, wörld!"
    for d in sys.argv[1:]:
        tok.save(f"{d}/tokenizer.json")


if __name__ == "__main__":
    main()
