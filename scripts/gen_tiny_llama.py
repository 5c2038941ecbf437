"""Writes tiny random Llama models (Hugging Face and GGUF) plus golden logits.

Usage: gen_tiny_llama.py OUT_DIR

Everything is made locally with fixed seeds, in f32:

  OUT_DIR/tied/       config.json + model.safetensors: tie_word_embeddings=True (no lm_head.weight)
  OUT_DIR/untied/     the same sizes, separate lm_head
  OUT_DIR/bias/       untied, attention_bias + mlp_bias, head_dim 24 (≠ hidden / heads = 16)
  OUT_DIR/reference.safetensors
                      input_ids i64 [2, 13]; logits_<variant> f32 [2, 13, 301] (eager attention)

  OUT_DIR/tied.gguf   the tied model as llama.cpp would write it: llama.cpp names, q/k rows
                      permuted, tensors in a mix of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 (gguf's own
                      quantizers), byte-level BPE tokenizer metadata (pre "smollm")
  OUT_DIR/bias.gguf   the bias model the same way, with output.weight, biases, key_length 24 and
                      general.alignment 64
  OUT_DIR/bad_q5.gguf one Q5_0 tensor, which octet must refuse by name
  OUT_DIR/gguf_reference.safetensors
                      <variant>.<HF name>: gguf.quants.dequantize of each stored tensor, q/k rows
                      un-permuted (f32); logits_<variant>: transformers on exactly those weights;
                      tokens_<variant>: ids of TOKENIZER_TEXT with the tokenizer the metadata describes
                      (built here with `tokenizers`)

Model: 2 layers, hidden 64, 4 heads, 2 kv heads, intermediate 96, vocab 301, rope_theta 10000,
rms_norm_eps 1e-5; weights re-initialised with std 0.2 (norm scales 1 ± 0.1) so logits differ.
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SEED = 0
BATCH, SEQ = 2, 13
VOCAB = 301
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. In 1911 the eleventh edition of the "
    "encyclopaedia was printed; it ran to 29 volumes and 40000 articles. Shakespeare was born "
    "in Stratford-upon-Avon in 1564, and there he died in 1616. "
) * 20
TOKENIZER_TEXT = "<|im_start|>The 2 foxes ran 1234 miles; the dog didn't.<|im_end|> héllo\n\n  x"

VARIANTS = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False),
    "bias": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=24),
}


def make_config(**kw):
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        **kw,
    )


@torch.no_grad()
def init_weights(model, g):
    """Deterministic init in name order: larger spread than HF's default."""
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif name.endswith(".weight"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            raise RuntimeError(f"unexpected parameter {name}")


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids).logits.float().contiguous()


# ---------------------------------------------------------------- GGUF side


def train_tokenizer():
    """A byte-level BPE of exactly VOCAB ids: 3 control tokens, 256 bytes, merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * VOCAB
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert all(t is not None for t in tokens)
    return tok, tokens, merges


def permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{GGUF_NAMES[module]}.{parts[-1]}"


# Storage type per (layer, module); everything 1-D stays F32, as llama.cpp writes it.
TYPES = {
    (0, "attn_q"): Q.Q4_0, (0, "attn_k"): Q.Q4_1, (0, "attn_v"): Q.F16, (0, "attn_output"): Q.Q8_0,
    (0, "ffn_gate"): Q.Q4_1, (0, "ffn_up"): Q.Q4_0, (0, "ffn_down"): Q.BF16,
    (1, "attn_q"): Q.Q8_0, (1, "attn_k"): Q.F16, (1, "attn_v"): Q.Q4_0, (1, "attn_output"): Q.Q4_1,
    (1, "ffn_gate"): Q.F32, (1, "ffn_up"): Q.Q8_0, (1, "ffn_down"): Q.Q4_1,
}


def storage_type(name, ndim):
    if ndim == 1:
        return Q.F32
    if name == "token_embd.weight":
        return Q.Q8_0
    if name == "output.weight":
        return Q.Q4_1
    _, layer, module, _ = name.split(".")
    return TYPES[(int(layer), module)]


def write_gguf(path, model, tokens, merges, alignment=None):
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(path, "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    if cfg.head_dim != cfg.hidden_size // heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    types = {}
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf)
        x = t.detach().float().numpy().copy()
        if ".attn_q." in name:
            x = permute(x, heads)
        elif ".attn_k." in name:
            x = permute(x, kv)
        ty = storage_type(name, x.ndim)
        data = gguf.quants.quantize(x, ty)
        w.add_tensor(name, data, raw_dtype=ty)
        types[name] = ty
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def read_back(path, cfg):
    """HF-named f32 tensors from gguf's own reader and de-quantizer, un-permuted."""
    r = gguf.GGUFReader(path)
    back = {"lm_head.weight": None}
    inverse = {gguf_name(k): k for k in LlamaForCausalLM(cfg).state_dict()}
    for t in r.tensors:
        hf = inverse[t.name]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(d) for d in reversed(t.shape)])
        if ".attn_q." in t.name:
            x = unpermute(x, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            x = unpermute(x, cfg.num_key_value_heads)
        back[hf] = torch.from_numpy(np.ascontiguousarray(x))
    if back["lm_head.weight"] is None:
        del back["lm_head.weight"]
    return back


def write_bad_gguf(path):
    w = gguf.GGUFWriter(path, "llama")
    x = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(x, Q.Q5_0), raw_dtype=Q.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- main


def main(out):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    os.makedirs(out, exist_ok=True)
    for sub in VARIANTS:
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    ref = {"input_ids": ids}
    models_ = {}
    for name, kw in VARIANTS.items():
        model = LlamaForCausalLM(make_config(**kw)).eval()
        init_weights(model, torch.Generator().manual_seed(SEED + len(models_)))
        model.set_attn_implementation("eager")
        ref[f"logits_{name}"] = logits_of(model, ids)
        d = os.path.join(out, name)
        model.save_pretrained(d, safe_serialization=True)
        keys = load_file(os.path.join(d, "model.safetensors")).keys()
        assert ("lm_head.weight" in keys) == (not kw["tie_word_embeddings"]), (name, sorted(keys))
        models_[name] = model
    save_file(ref, os.path.join(out, "reference.safetensors"))

    tok, tokens, merges = train_tokenizer()
    gref = {}
    summary = []
    for name, alignment in (("tied", None), ("bias", 64)):
        model = models_[name]
        path = os.path.join(out, f"{name}.gguf")
        types = write_gguf(path, model, tokens, merges, alignment)
        back = read_back(path, model.config)
        sd = model.state_dict()
        for k, v in back.items():
            gref[f"{name}.{k}"] = v
            # The un-permuted de-quantization is close to the original: the permutation's
            # direction is right (a wrong one would scramble rows).
            err = (v - sd[k]).abs().max().item()
            assert err < 0.1, (name, k, err)
        m = LlamaForCausalLM(model.config).eval()
        m.load_state_dict(back, strict=not model.config.tie_word_embeddings)
        if model.config.tie_word_embeddings:
            assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        m.set_attn_implementation("eager")
        gref[f"logits_{name}"] = logits_of(m, ids)
        gref[f"tokens_{name}"] = torch.tensor(tok.encode(TOKENIZER_TEXT, add_special_tokens=False).ids)
        summary.append((name, path, sorted({t.name for t in types.values()})))
        if not model.config.attention_bias:
            # transformers' GGUF config reader does not infer attention/MLP biases.
            cross_check_transformers(path, out, m, ids)
    save_file(gref, os.path.join(out, "gguf_reference.safetensors"))
    write_bad_gguf(os.path.join(out, "bad_q5.gguf"))

    print(f"wrote {out}")
    for name in VARIANTS:
        print(f"  {name}/: logits std {ref[f'logits_{name}'].std():.3f}")
    for name, path, kinds in summary:
        d = (gref[f"logits_{name}"] - ref[f"logits_{name}"]).abs().max().item()
        print(f"  {os.path.basename(path)}: types {kinds}; |logits(gguf weights) - logits(f32)| max {d:.4f}")
    print(f"  tokenizer: {VOCAB} ids, {len(merges)} merges; '{TOKENIZER_TEXT[:24]}...' -> "
          f"{gref['tokens_tied'].tolist()[:12]}...")


@torch.no_grad()
def cross_check_transformers(path, out, m, ids):
    """transformers' own GGUF loader, where it can read the file, must agree with our reading."""
    try:
        t = LlamaForCausalLM.from_pretrained(out, gguf_file=os.path.basename(path), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- an optional second opinion
        print(f"  (transformers could not load {os.path.basename(path)}: {type(e).__name__}: {str(e)[:120]})")
        return
    t.eval().set_attn_implementation("eager")
    d = (logits_of(t, ids) - logits_of(m, ids)).abs().max().item()
    assert d < 1e-4, f"transformers' GGUF loader disagrees on {path}: {d}"
    print(f"  transformers' GGUF loader agrees on {os.path.basename(path)} (max |dlogits| {d:.2e})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
