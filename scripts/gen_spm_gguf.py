"""Writes small GGUF files with SentencePiece tokenizers, plus transformers' ids for them.

Usage: gen_spm_gguf.py OUT_DIR

A SentencePiece BPE model is trained here (the `sentencepiece` package, one thread, fixed
corpus, so the vocabulary is the same every run) with Llama's trainer settings: byte fallback
(256 tokens <0x00>..<0xFF>), digits split, whitespace kept as written, a dummy prefix. Its
pieces, scores and types go into GGUF metadata the way llama.cpp's converter writes them
(`tokenizer.ggml.model = "llama"`, no merges).

  OUT_DIR/llama.gguf   a tiny random llama model (2 layers, hidden 64, F32/F16 tensors, q/k rows
                       permuted as llama.cpp does) with that tokenizer: <unk> 0, <s> 1, </s> 2,
                       control tokens <|im_start|> / <|im_end|>, a user-defined <sep>,
                       add_bos_token true, and a chat template
  OUT_DIR/bpe.gguf     the same model with gen_tiny_llama.py's byte-level BPE tokenizer
                       (`tokenizer.ggml.model = "gpt2"`, pre "default"), add_bos_token true,
                       and the chat template
  OUT_DIR/phi3.gguf    the same vocabulary, tokenizer metadata only, architecture "phi3"
                       (transformers builds Phi-3's normalizer instead of Metaspace)
  OUT_DIR/gemma2.gguf  a Gemma-style vocabulary (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4,
                       no dummy prefix, whitespace-only pieces stored with real spaces as
                       llama.cpp writes Gemma's), tokenizer metadata only, architecture "gemma2"
  OUT_DIR/vectors.json {file: hf_tokenize.py's JSON for TEXTS, plus "byte_fallback_ids"}:
                       transformers' `encode` with add_special_tokens False / True and
                       `decode` of each, from `AutoTokenizer.from_pretrained(OUT_DIR,
                       gguf_file=...)`
"""
import io
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from gen_tiny_llama import SPECIALS as BPE_SPECIALS  # noqa: E402
from gen_tiny_llama import VOCAB as BPE_VOCAB  # noqa: E402
from gen_tiny_llama import gguf_name, init_weights, permute  # noqa: E402
from gen_tiny_llama import train_tokenizer as train_bpe  # noqa: E402
from hf_tokenize import load, tokenize_all  # noqa: E402

SEED = 0
VOCAB = 480
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1911 the eleventh edition of the encyclopaedia was printed; it ran to 29 volumes.",
    "Shakespeare was born in Stratford-upon-Avon in 1564, and there he died in 1616.",
    "A café in the old town serves crème brûlée and naïve piña coladas to tourists.",
    "Über den Wolken ist die Freiheit grenzenlos, sagt man in München.",
    "東京は日本の首都です。",
    "def main():\n    return 42  # the answer\n",
    "    indented  with  double  spaces and a tab\there",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
]

# transformers' and octet's outputs are compared on these: leading, repeated and trailing
# spaces, tabs and newlines, digits, accents, CJK and emoji, characters outside the vocabulary
# (byte fallback), control and user-defined tokens.
TEXTS = [
    "Hello world",
    " Hello world",
    "",
    " ",
    "  two leading spaces",
    "   leading and trailing spaces   ",
    "double  spaces   and\ttabs",
    "newlines\n\nand\r\nwindows\n",
    "\n\n\n",
    "digits 0 7 42 1234567890 3.14159 1,000,000",
    "accents: café naïve crème brûlée Ångström straße",
    "CJK: 東京は日本の首都です。 中文测试",
    "emoji: 🙂 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "unseen: Привет ψ ∑ ‰ \u0000 \u007f",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "before<sep>after <sep> spaced",
    "<s>literal specials</s> and <unk>",
    "    def f(x):\n        return x ** 2\n",
]

# SentencePiece piece types, as llama.cpp writes them in tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def train(**settings):
    """A SentencePiece BPE model with Llama's trainer settings (unless `settings` say
    otherwise); returns its processor."""
    model = io.BytesIO()
    settings = {"add_dummy_prefix": True, **settings}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        **settings,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def pieces(sp):
    """(token, score, type) of every id, as llama.cpp's converter reads them."""
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            ty = UNKNOWN
        elif sp.is_control(i):
            ty = CONTROL
        elif sp.is_unused(i):
            ty = UNUSED
        elif sp.is_byte(i):
            ty = BYTE
        else:
            ty = NORMAL
        out.append([sp.id_to_piece(i), sp.get_score(i), ty])
    return out


def mark_user_defined(vocab, names):
    for v in vocab:
        if v[0] in names:
            v[2] = USER_DEFINED


def write_tokenizer(w, vocab, bos, eos, unk, pad=None, add_bos=True):
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([v[0] for v in vocab])
    w.add_token_scores([float(v[1]) for v in vocab])
    w.add_token_types([v[2] for v in vocab])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    if pad is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama(path, vocab_size, write_tok):
    """A tiny random llama model whose tokenizer metadata `write_tok(writer)` writes."""
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    init_weights(model, torch.Generator().manual_seed(SEED))
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama spm")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    write_tok(w)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight":
            continue
        name = gguf_name(hf)
        x = t.detach().float().numpy().copy()
        if ".attn_q." in name:
            x = permute(x, cfg.num_attention_heads)
        elif ".attn_k." in name:
            x = permute(x, cfg.num_key_value_heads)
        ty = Q.F32 if x.ndim == 1 else Q.F16
        w.add_tensor(name, gguf.quants.quantize(x, ty), raw_dtype=ty)
    finish(w)


def write_byte_level(w):
    """gen_tiny_llama's byte-level BPE, BOS added, with the chat template."""
    _, tokens, merges = train_bpe()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if t in BPE_SPECIALS else NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)


def write_vocab_only(path, arch, vocab, **ids):
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"{arch} spm tokenizer")
    write_tokenizer(w, vocab, **ids)
    finish(w)


def gemma_vocab():
    """Gemma's layout and llama.cpp's spelling of it: whitespace-only pieces in real spaces."""
    sp = train(
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", add_dummy_prefix=False,
        control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        user_defined_symbols=["<sep>"],
        allow_whitespace_only_pieces=True,
    )
    vocab = pieces(sp)
    mark_user_defined(vocab, {"<sep>"})
    runs = 0
    for v in vocab:
        if len(v[0]) > 1 and set(v[0]) == {"\u2581"}:
            v[0] = " " * len(v[0])
            runs += 1
    assert runs > 0, "no whitespace-only piece was learned"
    return vocab


def reference(out, name):
    tok = load(out, name)
    doc = tokenize_all(tok, TEXTS)
    tok_names = tok.convert_ids_to_tokens(range(len(tok)))
    used = sum(1 for v in doc["vectors"] for i in v["ids"] if tok_names[i].startswith("<0x"))
    assert used > 0 or name == "bpe.gguf", f"{name}: no text falls back to bytes"
    doc["byte_fallback_ids"] = used
    return doc


def main(out):
    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    os.makedirs(out, exist_ok=True)

    sp = train(control_symbols=["<|im_start|>", "<|im_end|>"], user_defined_symbols=["<sep>"])
    vocab = pieces(sp)
    mark_user_defined(vocab, {"<sep>"})
    assert [v[0] for v in vocab[:3]] == ["<unk>", "<s>", "</s>"], vocab[:3]
    assert sum(v[2] == BYTE for v in vocab) == 256
    write_llama(os.path.join(out, "llama.gguf"), len(vocab),
                lambda w: write_tokenizer(w, vocab, bos=1, eos=2, unk=0))
    write_llama(os.path.join(out, "bpe.gguf"), BPE_VOCAB, write_byte_level)
    write_vocab_only(os.path.join(out, "phi3.gguf"), "phi3", vocab, bos=1, eos=2, unk=0)
    write_vocab_only(os.path.join(out, "gemma2.gguf"), "gemma2", gemma_vocab(), bos=2, eos=1, unk=3, pad=0)

    names = ("llama.gguf", "phi3.gguf", "gemma2.gguf", "bpe.gguf")
    doc = {name: reference(out, name) for name in names}
    tmp = os.path.join(out, f"vectors.json.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(out, "vectors.json"))
    for name, d in doc.items():
        print(f"{name}: vocab {d['vocab_size']}, {d['byte_fallback_ids']} byte-fallback ids; "
              f"{d['vectors'][0]['text']!r} -> {d['vectors'][0]['ids_special']}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
