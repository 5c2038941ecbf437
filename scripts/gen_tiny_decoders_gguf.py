"""Writes GGUF files of tiny Llama 3, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 2 models with llama.cpp's
own converter, plus what they must read back as.

Usage: gen_tiny_decoders_gguf.py OUT_DIR LLAMA_CPP_DIR

LLAMA_CPP_DIR holds llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ (scripts/
fetch_llama_cpp_converter.sh takes them from the llama-cpp-python sdist, which vendors llama.cpp).
The converter runs unchanged except for one thing: our tiny BPE tokenizers are unknown to its
pre-tokenizer table (a hash of how they split a test string), so an unknown hash is given the
name the real models of that family carry (llama-bpe, qwen2) instead of stopping the conversion.

The source models are NOT the odd-sized ones of gen_tiny_decoders.py: Q8_0 quantizes rows in blocks
of 32, and llama.cpp's converter silently falls back to F16 for a row length that is not a multiple
of 32 (hidden 48 would give no Q8_0 tensor at all). Here: vocab 251, hidden 64, intermediate 96,
2 layers, 4 heads / 2 kv heads, rms_norm_eps 1e-5, weights re-initialised as in gen_tiny_decoders.py.

  OUT_DIR/gguf/<V>.gguf        --outtype f32
  OUT_DIR/gguf/<V>.q8_0.gguf   --outtype q8_0 (1-D tensors stay F32, as llama.cpp writes them)
  OUT_DIR/gguf/configs.json    {V: the source model's config.json as save_pretrained wrote it}
  OUT_DIR/gguf/reference.safetensors, per variant V:
      V.input_ids      i64 [2, 24]
      V.<HF name>      f32: gguf's de-quantization of V.q8_0.gguf mapped back to Hugging Face names
                       and layout (llama/mistral q/k rows un-permuted, Gemma 2 norms minus 1, Phi-3
                       fused tensors kept fused)
      V.logits         f32 [2, 24, 251]: transformers on exactly those weights, with the config the
                       GGUF's metadata implies
      V.logits_f32     the same for V.gguf (f32 weights; equal to the source model's logits except
                       where the GGUF drops something, see mistral)
      mistral.logits_sliding  the source Mistral (sliding_window 5) on the q8_0 weights, which is
                       also what OUT_DIR/gguf/mistral_swa.q8_0.gguf must give: mistral.q8_0.gguf
                       with llama.attention.sliding_window = 5 added (gguf-py's writer), the way
                       a converter that keeps Mistral's window would store it

Variants (llama.cpp architecture in brackets):
  llama3   [llama]  head_dim 24, attention_bias, tied, rope llama3 {factor 8, low 1, high 4, orig 32}:
                    frequencies 1 unscaled, 2 smoothed, 9 scaled (two smoothed ones pin the rule down)
  mistral  [llama]  head_dim 16, sliding_window 5, untied
  qwen2    [qwen2]  q/k/v biases, tied
  qwen3    [qwen3]  head_dim 24, q_norm/k_norm, untied
  phi3     [phi3]   partial_rotary_factor 0.5, longrope (4 short / 4 long factors, orig 16, max 64),
                    untied, fused qkv_proj / gate_up_proj
  gemma2   [gemma2] head_dim 24, query_pre_attn_scalar 24 (= head_dim: the GGUF cannot say otherwise),
                    sliding_window 5, layers [sliding, full], softcaps 3 / 4, tied

What llama.cpp's converter writes (checked below, printed per file):
  * llama, mistral: arch "llama"; q_proj and k_proj weights AND biases permuted per head
    (reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)); k with the kv head count. head_dim, when present
    in config.json, goes to llama.attention.key_length/value_length and rope.dimension_count.
    Llama 3 rope: no llama.rope.scaling.* keys at all; a tensor rope_freqs.weight [head_dim/2] F32
    holds per-frequency divisors (1 unscaled, factor scaled, 1/((1-s)/factor + s) smoothed).
    Linear rope: llama.rope.scaling.type "linear" + llama.rope.scaling.factor. Dynamic: nothing.
    Mistral's sliding_window is NOT written: a Mistral GGUF reads back as full attention.
  * qwen2 / qwen3: no permutation; qwen3's q_norm/k_norm are blk.N.attn_q_norm / attn_k_norm
    [head_dim]. Tied models have no output.weight.
  * phi3: blk.N.attn_qkv.weight (q, k, v rows stacked as in HF's qkv_proj) and blk.N.ffn_up.weight
    holding HF's gate_up_proj (gate rows then up rows; there is no ffn_gate); phi3.rope.dimension_count
    = rotary dim; phi3.rope.scaling.original_context_length; phi3.rope.scaling.attn_factor
    (sqrt(1 + ln(max/orig)/ln(orig))); tensors rope_factors_long.weight / rope_factors_short.weight;
    phi3.attention.sliding_window 0 when config.json has none.
  * gemma2: every *norm.weight stored as w + 1 (HF keeps w, multiplies by 1 + w); names
    attn_norm, post_attention_norm, ffn_norm (pre-feedforward), post_ffw_norm; no output.weight
    (the head is always tied); gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping,
    gemma2.attention.sliding_window; key_length/value_length = head_dim. NOT written:
    query_pre_attn_scalar (llama.cpp scales queries by 1/sqrt(key_length), or by
    1/sqrt(hidden/heads) for 46-layer files, Gemma 2 27B), the layer pattern (llama.cpp: layer i
    slides iff i is even, unless gemma2.attention.sliding_window_pattern says otherwise),
    hidden_activation, rope theta (llama.cpp's default 10000). Without the softcap keys llama.cpp
    uses 50 / 30 and without the window 4096 (Gemma 2's values).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SEED = 100
BATCH, SEQ = 2, 24
VOCAB = 251
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. In 1911 the eleventh edition of the "
    "encyclopaedia was printed; it ran to 29 volumes and 40000 articles. Shakespeare was born "
    "in Stratford-upon-Avon in 1564, and there he died in 1616. "
) * 20

# variant: (HF class, config class, config overrides, llama.cpp arch, tokenizer kind, pre name)
VARIANTS = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        head_dim=24, attention_bias=True, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)), "llama", "bpe", "llama-bpe"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        head_dim=16, sliding_window=5, tie_word_embeddings=False), "llama", "bpe", "llama-bpe"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True), "qwen2", "bpe", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=24, tie_word_embeddings=False),
              "qwen3", "bpe", "qwen2"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(
        partial_rotary_factor=0.5, tie_word_embeddings=False, original_max_position_embeddings=16,
        hidden_act="silu", rope_scaling=dict(type="longrope", short_factor=[1.0, 1.25, 1.5, 2.0],
                                             long_factor=[1.5, 2.5, 4.0, 7.0])), "phi3", "spm", None),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        head_dim=24, query_pre_attn_scalar=24, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
        "gemma2", "spm", None),
}

# llama.cpp block tensor name -> HF module, per architecture family (weights and biases alike).
BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
}
FFN_UP = {"phi3": "mlp.gate_up_proj"}
FFN_NORM = {"gemma2": "pre_feedforward_layernorm"}
GEMMA2_EXTRA = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
ROPE_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def hf_name(arch, raw):
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if raw in top:
        return top[raw]
    _, n, part, param = raw.split(".")
    if part == "ffn_up":
        module = FFN_UP.get(arch, "mlp.up_proj")
    elif part == "ffn_norm":
        module = FFN_NORM.get(arch, "post_attention_layernorm")
    elif arch == "gemma2" and part in GEMMA2_EXTRA:
        module = GEMMA2_EXTRA[part]
    else:
        module = BLOCK[part]
    return f"model.layers.{n}.{module}.{param}"


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- models and tokenizers


@torch.no_grad()
def init_weights(model, g, gemma):
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_model(name, i):
    cls_name, cfg_name, kw, *_ = VARIANTS[name]
    cfg = getattr(transformers, cfg_name)(**COMMON, **kw)
    model = getattr(transformers, cls_name)(cfg).eval()
    init_weights(model, torch.Generator().manual_seed(SEED + i), gemma=name == "gemma2")
    model.set_attn_implementation("eager")
    return model


def write_bpe_tokenizer(d):
    """A byte-level BPE of exactly VOCAB ids over the corpus's characters (a full byte alphabet
    alone would not fit in 251 ids): <pad>, <s>, </s>, then the learnt vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>", "add_bos_token": False}, f)


def write_spm_tokenizer(d):
    """A SentencePiece BPE model of VOCAB pieces (<unk> 0, <s> 1, </s> 2) as tokenizer.model."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split(". ")), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------- conversion

WRAPPER = r"""
import sys, runpy
root = sys.argv.pop(1)
pre = sys.argv.pop(1)
sys.path[:0] = [root + "/gguf-py", root]
from conversion import base
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(llama_cpp, src, out, outtype, pre):
    cmd = [sys.executable, "-c", WRAPPER, llama_cpp, pre or "default", src, "--outtype", outtype, "--outfile", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        sys.exit(f"llama.cpp's converter failed on {src} ({outtype}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


# ---------------------------------------------------------------- reading back


def read_back(gguf, path, arch, cfg):
    """HF-named f32 tensors from gguf's reader and de-quantizer, llama.cpp's changes undone; the
    rope tensors under their own names; the metadata as a dict."""
    r = gguf.GGUFReader(path)
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("tokenizer.ggml.") and f.name not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        v = f.contents()
        meta[f.name] = v
    weights, rope, types = {}, {}, {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(d) for d in reversed(t.shape)])
        types[t.name] = t.tensor_type.name
        if t.name in ROPE_TENSORS:
            rope[t.name] = torch.from_numpy(np.ascontiguousarray(x))
            continue
        if arch == "llama" and ".attn_q." in t.name:
            x = unpermute(x, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in t.name:
            x = unpermute(x, cfg.num_key_value_heads)
        if arch == "gemma2" and t.name.endswith("norm.weight"):
            x = x - np.float32(1.0)
        weights[hf_name(arch, t.name)] = torch.from_numpy(np.ascontiguousarray(x))
    return weights, rope, types, meta


def with_sliding_window(gguf, src, dst, window):
    """A copy of the llama-arch file `src` with llama.attention.sliding_window set, as a Mistral
    GGUF written by a tool that keeps the window would carry it."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    w.add_sliding_window(window)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_config(name, model):
    """The model the GGUF's metadata describes, as transformers builds it: llama.cpp drops
    Mistral's sliding window (and the llama arch is read as Llama)."""
    cfg = model.config
    if name == "mistral":
        d = cfg.to_dict()
        for k in ("sliding_window", "model_type", "architectures", "transformers_version"):
            d.pop(k, None)
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(**d)
    return type(model), cfg


@torch.no_grad()
def logits_with(cls, cfg, weights, ids):
    m = cls(cfg).eval()
    missing, unexpected = m.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings), missing
    m.set_attn_implementation("eager")
    m.tie_weights()
    if cfg.tie_word_embeddings:
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    return m(input_ids=ids).logits.float().contiguous()


def llama3_factors(rp, head_dim):
    """transformers' llama3 rule as per-frequency divisors of the default inv_freq."""
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaled = transformers.modeling_rope_utils._compute_llama3_parameters
    cfg = transformers.LlamaConfig(head_dim=head_dim, hidden_size=COMMON["hidden_size"],
                                   num_attention_heads=COMMON["num_attention_heads"], rope_scaling=dict(rp))
    inv_scaled, _ = scaled(cfg, "cpu")
    return inv / inv_scaled


def check_metadata(name, arch, model, meta, rope, types, outtype):
    cfg = model.config
    a = arch
    assert meta["general.architecture"] == arch, meta["general.architecture"]
    assert meta[f"{a}.block_count"] == 2 and meta[f"{a}.embedding_length"] == 64
    assert meta[f"{a}.attention.head_count"] == 4 and meta[f"{a}.attention.head_count_kv"] == 2
    head_dim = getattr(cfg, "head_dim", 16)
    if name == "llama3":
        rp = cfg.rope_parameters
        assert not any(k.startswith("llama.rope.scaling") for k in meta), [k for k in meta if "scaling" in k]
        expect = llama3_factors(rp, head_dim)
        got = rope["rope_freqs.weight"]
        # llama.cpp divides the default frequency by these; transformers' own rule gives the same.
        assert torch.allclose(got, expect.float(), rtol=1e-6), (got, expect)
        print(f"    rope_freqs.weight {[round(v, 5) for v in got.tolist()]}")
    if name == "mistral":
        assert not any("sliding_window" in k for k in meta), "the llama converter now writes a window"
    if name == "phi3":
        assert meta["phi3.rope.dimension_count"] == 8
        assert meta["phi3.rope.scaling.original_context_length"] == 16
        assert abs(meta["phi3.rope.scaling.attn_factor"] - math.sqrt(1 + math.log(4) / math.log(16))) < 1e-6
        assert rope["rope_factors_long.weight"].tolist() == cfg.rope_parameters["long_factor"]
        assert rope["rope_factors_short.weight"].tolist() == cfg.rope_parameters["short_factor"]
    if name == "gemma2":
        assert meta["gemma2.attn_logit_softcapping"] == 3.0 and meta["gemma2.final_logit_softcapping"] == 4.0
        assert meta["gemma2.attention.sliding_window"] == 5
        assert meta["gemma2.attention.key_length"] == 24
    two_d = {k: v for k, v in types.items() if k not in ROPE_TENSORS and not k.endswith(("norm.weight", ".bias"))}
    want = "F32" if outtype == "f32" else "Q8_0"
    assert set(two_d.values()) == {want}, types


@torch.no_grad()
def cross_check_transformers(name, path, logits_ours, ids, ours):
    """transformers' own GGUF loader, where it reads the file, against our reading."""
    d, f = os.path.split(path)
    try:
        t = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 -- an optional second opinion
        print(f"    transformers cannot load {f}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        return
    t.set_attn_implementation("eager")
    diff = (t(input_ids=ids).logits.float() - logits_ours).abs().max().item()
    why = ""
    if diff >= 1e-4:
        theirs = t.config.to_dict()
        keys = ("rope_parameters", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                "sliding_window", "layer_types", "partial_rotary_factor", "head_dim")
        why = "; its config differs in " + ", ".join(
            f"{k}={theirs.get(k)!r} (ours {ours.get(k)!r})" for k in keys if theirs.get(k) != ours.get(k))
    print(f"    transformers' GGUF loader ({type(t).__name__}) on {f}: max |dlogits| vs ours {diff:.2e}"
          + ("" if diff < 1e-4 else f"  (DISAGREES{why})"))


def main(out, llama_cpp):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    import gguf  # the converter's own copy
    gdir = os.path.join(out, "gguf")
    shutil.rmtree(gdir, ignore_errors=True)
    os.makedirs(gdir)
    ref, configs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (_, _, _, arch, tok_kind, pre)) in enumerate(VARIANTS.items()):
            model = make_model(name, i)
            src = os.path.join(tmp, name)
            model.save_pretrained(src, safe_serialization=True)
            configs[name] = json.load(open(os.path.join(src, "config.json")))
            (write_bpe_tokenizer if tok_kind == "bpe" else write_spm_tokenizer)(src)
            ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED + 50 + i))
            ref[f"{name}.input_ids"] = ids
            sd = model.state_dict()
            if model.config.tie_word_embeddings:
                sd.pop("lm_head.weight")
            cls, cfg = gguf_config(name, model)
            print(f"  {name} [{arch}]")
            for outtype, fname in (("f32", f"{name}.gguf"), ("q8_0", f"{name}.q8_0.gguf")):
                path = os.path.join(gdir, fname)
                convert(llama_cpp, src, path, outtype, pre)
                weights, rope, types, meta = read_back(gguf, path, arch, model.config)
                check_metadata(name, arch, model, meta, rope, types, outtype)
                assert set(weights) == set(sd), (set(weights) ^ set(sd))
                worst = max((weights[k] - sd[k]).abs().max().item() for k in sd)
                # f32 is exact (Gemma's norms up to rounding of w + 1); Q8_0 is close.
                assert worst < (1e-6 if outtype == "f32" else 0.02), (name, outtype, worst)
                logits = logits_with(cls, cfg, weights, ids)
                if outtype == "f32":
                    ref[f"{name}.logits_f32"] = logits
                else:
                    ref[f"{name}.logits"] = logits
                    for k, v in weights.items():
                        ref[f"{name}.{k}"] = v
                    if name == "mistral":
                        ref["mistral.logits_sliding"] = logits_with(type(model), model.config, weights, ids)
                        swa = os.path.join(gdir, "mistral_swa.q8_0.gguf")
                        with_sliding_window(gguf, path, swa, model.config.sliding_window)
                        again, _, _, swa_meta = read_back(gguf, swa, arch, model.config)
                        assert swa_meta["llama.attention.sliding_window"] == 5
                        assert all(torch.equal(again[k], weights[k]) for k in weights)
                print(f"    {fname}: {os.path.getsize(path) / 1e3:.0f} kB, max |w - source| {worst:.1e}, "
                      f"tensors {sorted(set(types.values()))}")
                cross_check_transformers(name, path, logits, ids, cfg.to_dict())
            if outtype == "q8_0":
                keys = sorted(k for k in meta if not k.startswith(("general.", "tokenizer.")))
                print(f"    metadata: { {k: meta[k] for k in keys} }")
                print(f"    tensors: {sorted(types)}")
            with torch.no_grad():
                own = model(input_ids=ids).logits
            d = (ref[f"{name}.logits_f32"] - own).abs().max().item()
            print(f"    f32 GGUF logits vs the source model: {d:.2e}"
                  + ("  (the GGUF drops the sliding window)" if name == "mistral" else ""))
    save_file(ref, os.path.join(gdir, "reference.safetensors"))
    with open(os.path.join(gdir, "configs.json"), "w") as f:
        json.dump(configs, f, indent=1, sort_keys=True)
    size = sum(os.path.getsize(os.path.join(gdir, f)) for f in os.listdir(gdir))
    print(f"wrote {gdir} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
