"""Writes tiny random decoders of today's architectures plus golden logits and greedy generations.

Usage: gen_tiny_decoders.py OUT_DIR

Everything is made locally with fixed seeds, in f32, by transformers (eager attention):

  OUT_DIR/<variant>/  config.json + model.safetensors + generation_config.json (save_pretrained)
  OUT_DIR/reference.safetensors, per variant V:
      V.input_ids  i64 [2, 24]       random ids (24 > sliding window 5 and > original context 16)
      V.logits     f32 [2, 24, 251]  model(input_ids).logits
      V.prompt     i64 [1, 4]
      V.greedy     i64 [1, 24]       generate(do_sample=False, use_cache=True, 20 new tokens, no eos)

Variants (vocab 251, hidden 48, intermediate 80, 2 layers, rms_norm_eps 1e-5 unless noted):

  llama3        LlamaForCausalLM, 3 heads, head_dim 20 (≠ 48/3), attention_bias, tied, rope_theta 10000,
                rope llama3 {factor 8, low_freq_factor 1, high_freq_factor 2,
                original_max_position_embeddings 16}, max_position_embeddings 64.
                high_freq_factor is 2, not Llama 3.1's 4: with an original context of 16 the high-
                frequency wavelength limit 16/4 = 4 is below the shortest wavelength 2π, so no
                frequency would stay unscaled. With 2 (limit 8) the 10 frequencies fall into all three
                bands: 1 unscaled, 1 smoothed, 8 scaled (printed).
  llama_linear  LlamaForCausalLM, 3 heads (head_dim 16), untied, rope linear {factor 2}.
  llama_dynamic LlamaForCausalLM, 3 heads, untied, rope dynamic {factor 2},
                max_position_embeddings 16 so the 24-token references use NTK-scaled frequencies.
  mistral       MistralForCausalLM, 4 heads / 2 kv heads (head_dim 12), sliding_window 5, untied.
  qwen2         Qwen2ForCausalLM, 4 heads / 2 kv heads, q/k/v biases (Qwen2 always has them), tied.
  qwen2_untied  the same, untied.
  qwen3         Qwen3ForCausalLM, 3 heads / 1 kv head, head_dim 20, q_norm/k_norm, untied.
  phi3          Phi3ForCausalLM, 3 heads (head_dim 16), partial_rotary_factor 0.5 (rotary dim 8),
                rope longrope with distinct short_factor/long_factor (4 values each),
                original_max_position_embeddings 16, max_position_embeddings 64, untied.
  gemma2        Gemma2ForCausalLM, 3 heads / 1 kv head, head_dim 20, query_pre_attn_scalar 32,
                sliding_window 5, layer_types [sliding_attention, full_attention],
                attn_logit_softcapping 3, final_logit_softcapping 4, gelu_pytorch_tanh, tied.

Sliding windows follow transformers: query i sees key j iff i - sliding_window < j <= i (the window
counts the query itself).

Weights are re-initialised in name order: std 0.2 for matrices, 1 ± 0.1 for norm scales (for Gemma 2,
whose RMSNorm multiplies by 1 + w, the stored w is 0.1·randn so the effective scale is 1 ± 0.1),
0.05·randn for biases.

config.json is what transformers 5.24's save_pretrained writes: rope settings appear as
`rope_parameters` (a dict holding rope_type, rope_theta and the scaling fields; `rope_scaling` and
top-level `rope_theta` are NOT written). Keys per class (printed by the script too):
  llama*:  rope_parameters {rope_type, rope_theta, factor, ...}; head_dim; attention_bias; mlp_bias
  mistral: rope_parameters {rope_type default, rope_theta}; head_dim; sliding_window
  qwen2:   rope_parameters; sliding_window null, use_sliding_window false, max_window_layers,
           layer_types (all full_attention)
  qwen3:   rope_parameters; head_dim; attention_bias false; layer_types; sliding_window null
  phi3:    rope_parameters {rope_type longrope, type longrope, rope_theta, short_factor,
           long_factor, original_max_position_embeddings, partial_rotary_factor}, plus top-level
           partial_rotary_factor and original_max_position_embeddings
  gemma2:  rope_parameters; head_dim; query_pre_attn_scalar; sliding_window; layer_types;
           attn_logit_softcapping; final_logit_softcapping; hidden_activation
A reader should accept both `rope_parameters` (transformers 5) and `rope_scaling` + `rope_theta`
(transformers 4 and most hub files).

Greedy decoding with use_cache=False is checked to give the same tokens as the cached run, except
for llama_dynamic and phi3: transformers picks the dynamic-NTK / longrope frequencies from the
longest position in each forward call, so a cached run rotates early keys with the short-context
frequencies while an uncached run re-rotates all of them with the long-context ones. The script
prints whether they actually differ (with these weights only llama_dynamic's do).

Longrope (phi3) as transformers computes it: every position of a forward call uses long_factor when
the call's largest position + 1 exceeds original_max_position_embeddings (16), else short_factor;
inv_freq = 1 / (factor_i * theta^(2i/rotary_dim)), and cos/sin are multiplied by
sqrt(1 + ln(64/16) / ln(16)). The 24-token reference logits therefore use long_factor throughout.
"""
import json
import math
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SEED = 0
BATCH, SEQ = 2, 24
PROMPT, NEW = 4, 20
VOCAB = 251
COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# transformers' own cached and uncached greedy runs may differ for these (see the docstring).
POSITION_DEPENDENT_ROPE = {"llama_dynamic", "phi3"}


def variants():
    return {
        "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
            num_attention_heads=3, num_key_value_heads=3, head_dim=20, attention_bias=True,
            tie_word_embeddings=True, max_position_embeddings=64, rope_theta=10000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=2.0,
                              original_max_position_embeddings=16))),
        "llama_linear": ("LlamaForCausalLM", "LlamaConfig", dict(
            num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False,
            max_position_embeddings=64, rope_theta=10000.0,
            rope_scaling=dict(rope_type="linear", factor=2.0))),
        "llama_dynamic": ("LlamaForCausalLM", "LlamaConfig", dict(
            num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False,
            max_position_embeddings=16, rope_theta=10000.0,
            rope_scaling=dict(rope_type="dynamic", factor=2.0))),
        "mistral": ("MistralForCausalLM", "MistralConfig", dict(
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=5,
            tie_word_embeddings=False, max_position_embeddings=64, rope_theta=10000.0)),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=64, rope_theta=10000.0)),
        "qwen2_untied": ("Qwen2ForCausalLM", "Qwen2Config", dict(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            max_position_embeddings=64, rope_theta=10000.0)),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
            num_attention_heads=3, num_key_value_heads=1, head_dim=20, tie_word_embeddings=False,
            max_position_embeddings=64, rope_theta=10000.0)),
        "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(
            num_attention_heads=3, num_key_value_heads=3, partial_rotary_factor=0.5,
            tie_word_embeddings=False, max_position_embeddings=64, original_max_position_embeddings=16,
            rope_theta=10000.0, hidden_act="silu",
            rope_scaling=dict(type="longrope", short_factor=[1.0, 1.25, 1.5, 2.0],
                              long_factor=[1.5, 2.5, 4.0, 7.0]))),
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
            num_attention_heads=3, num_key_value_heads=1, head_dim=20, query_pre_attn_scalar=32,
            sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            max_position_embeddings=64, rope_theta=10000.0)),
    }


def make_model(cls_name, cfg_name, kw):
    cfg = getattr(transformers, cfg_name)(**COMMON, **kw)
    return getattr(transformers, cls_name)(cfg).eval()


@torch.no_grad()
def init_weights(model, g, gemma):
    """Deterministic init in name order: larger spread than HF's default."""
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            base = 0.0 if gemma else 1.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif name.endswith(".weight"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            raise RuntimeError(f"unexpected parameter {name}")


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids).logits.float().contiguous()


@torch.no_grad()
def greedy(model, prompt, use_cache):
    out = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=use_cache,
        max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
    )
    assert out.shape == (1, PROMPT + NEW), out.shape
    return out.contiguous()


def llama3_bands(cfg):
    """Which llama3 band each frequency falls in, as transformers' _compute_llama3_parameters splits."""
    rp = cfg.rope_parameters
    dim = cfg.head_dim
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelen = 2 * math.pi / inv
    old = rp["original_max_position_embeddings"]
    low_wl, high_wl = old / rp["low_freq_factor"], old / rp["high_freq_factor"]
    bands = ["unscaled" if w < high_wl else "scaled" if w > low_wl else "smoothed" for w in wavelen.tolist()]
    assert {"unscaled", "smoothed", "scaled"} <= set(bands), bands
    return bands


@torch.no_grad()
def check_softcaps_matter(model, ids):
    """Turning Gemma 2's soft-capping off must change the logits clearly."""
    ref = logits_of(model, ids)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        # The attention layers copy their cap at construction; the final cap is read from the config.
        holders = [model.config] + [m for m in model.modules() if hasattr(m, key) and m is not model.config]
        old = [getattr(h, key) for h in holders]
        for h in holders:
            setattr(h, key, None)
        d = (logits_of(model, ids) - ref).abs().max().item()
        for h, v in zip(holders, old):
            setattr(h, key, v)
        assert d > 1e-2, f"{key} does not change the logits ({d})"
        print(f"    without {key}: max |dlogits| {d:.3f}")
    assert (logits_of(model, ids) - ref).abs().max().item() == 0.0


def rope_summary(cfg):
    rp = dict(cfg.rope_parameters)
    for k in ("short_factor", "long_factor"):
        if k in rp:
            rp[k] = [round(x, 3) for x in rp[k]]
    return rp


def main(out):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    os.makedirs(out, exist_ok=True)
    ref = {}
    disagree = []
    for i, (name, (cls_name, cfg_name, kw)) in enumerate(variants().items()):
        d = os.path.join(out, name)
        shutil.rmtree(d, ignore_errors=True)
        model = make_model(cls_name, cfg_name, kw)
        init_weights(model, torch.Generator().manual_seed(SEED + i), gemma=name.startswith("gemma"))
        model.set_attn_implementation("eager")
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        g = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
        prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=g, dtype=torch.int64)
        ref[f"{name}.input_ids"] = ids
        ref[f"{name}.logits"] = logits_of(model, ids)
        ref[f"{name}.prompt"] = prompt
        ref[f"{name}.greedy"] = greedy(model, prompt, use_cache=True)
        uncached = greedy(model, prompt, use_cache=False)
        same = torch.equal(uncached, ref[f"{name}.greedy"])
        if name not in POSITION_DEPENDENT_ROPE:
            assert same, f"{name}: transformers' cached and uncached greedy runs differ"
        elif not same:
            disagree.append(name)
        model.save_pretrained(d, safe_serialization=True)

        # Round trip: the saved folder gives the same model and logits.
        back = getattr(transformers, cls_name).from_pretrained(d, dtype=torch.float32).eval()
        back.set_attn_implementation("eager")
        assert torch.equal(logits_of(back, ids), ref[f"{name}.logits"]), name
        keys = load_file(os.path.join(d, "model.safetensors")).keys()
        tied = model.config.tie_word_embeddings
        assert ("lm_head.weight" in keys) == (not tied), (name, sorted(keys))
        saved = json.load(open(os.path.join(d, "config.json")))
        assert "rope_scaling" not in saved or saved["rope_scaling"] is None or "rope_parameters" in saved
        assert back.config.rope_parameters == model.config.rope_parameters, name

        print(f"  {name}: {cls_name}, logits std {ref[f'{name}.logits'].std():.3f}, tied={tied}, "
              f"cached==uncached greedy: {same}")
        print(f"    rope as used: {rope_summary(back.config)}")
        print(f"    config.json keys: {sorted(k for k in saved if k not in ('architectures', 'dtype', 'transformers_version'))}")
        if name == "llama3":
            print(f"    llama3 bands per frequency: {llama3_bands(back.config)}")
        if name == "gemma2":
            print(f"    layer_types {back.config.layer_types}, sliding_window {back.config.sliding_window}")
            check_softcaps_matter(model, ids)
    path = os.path.join(out, "reference.safetensors")
    save_file(ref, path)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({size / 1e6:.2f} MB); cached and uncached greedy runs differ for: {disagree or 'none'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
