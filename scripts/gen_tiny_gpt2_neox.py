"""Writes a tiny random GPT-2 and a tiny random GPT-NeoX (Pythia layout) with golden logits.

Usage: gen_tiny_gpt2_neox.py OUT_DIR

Everything is made locally (no model hub) with fixed seeds and in f32:

  OUT_DIR/tiny_gpt2/hf_safetensors/   config.json + model.safetensors (save_pretrained: Conv1D
                                      weights stored [in, out], no lm_head.weight since the head is
                                      tied to transformer.wte) + a byte-level tokenizer.json
  OUT_DIR/tiny_gpt2/hf_bin/           pytorch_model.bin of the same weights plus the old
                                      `attn.bias` / `attn.masked_bias` buffers real GPT-2
                                      checkpoints carry (a loader must ignore them)
  OUT_DIR/tiny_gpt2/reference.safetensors
                                      input_ids i64 [2, 13]; logits f32 [2, 13, 301]

  OUT_DIR/tiny_gpt_neox/hf_safetensors/  config.json (transformers 5 form, `rope_parameters`) +
                                      model.safetensors (+ tokenizer.json)
  OUT_DIR/tiny_gpt_neox/hf_bin/       pytorch_model.bin as Pythia checkpoints are: the head named
                                      embed_out, the old `attention.bias`, `attention.masked_bias`
                                      and `attention.rotary_emb.inv_freq` buffers, and a
                                      config.json in the original form (`rotary_pct`,
                                      `rotary_emb_base`, no `rope_parameters`)
  OUT_DIR/tiny_gpt_neox/hf_sequential/   the same weights with use_parallel_residual = false
  OUT_DIR/tiny_gpt_neox/reference.safetensors
                                      input_ids i64 [2, 13]; logits (parallel residual) and
                                      logits_sequential, f32 [2, 13, 301]

GPT-2: vocab 301 (odd, so quantization blocks are partial), n_positions 64, n_layer 2, n_embd 48,
n_head 4, gelu_new, tied head. GPT-NeoX: vocab 301, hidden 64, 2 layers, 4 heads (head size 16),
intermediate 192, rotary_pct 0.25 (4 rotated dimensions per head), rotary base 5000, gelu, untied
embed_out, parallel residual. Weights are re-initialised with larger spreads than the default so
logits differ a lot; no dropout. Reference logits use eager attention; every layout is reloaded
and checked against them.
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_byte_tokenizer import build as build_tokenizer  # noqa: E402

BATCH, SEQ = 2, 13


def gpt2_config():
    return GPT2Config(
        vocab_size=301,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=256,
        eos_token_id=256,
    )


def neox_config(parallel=True):
    return GPTNeoXConfig(
        vocab_size=301,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=5000,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_parallel_residual=parallel,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=256,
    )


@torch.no_grad()
def init_weights(model, g):
    """Deterministic init, parameters visited in name order: larger spread than HF's default."""
    mods = dict(model.named_modules())
    for name, p in sorted(model.named_parameters()):
        mod = mods[name.rsplit(".", 1)[0]]
        leaf = name.rsplit(".", 1)[1]
        if isinstance(mod, torch.nn.LayerNorm):
            if leaf == "weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding, Conv1D)):
            std = 0.2 if leaf == "weight" else 0.05
            p.copy_(std * torch.randn(p.shape, generator=g))
        else:
            raise RuntimeError(f"unexpected parameter {name}")


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids).logits.float().contiguous()


def state_dict(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_config(model, d):
    os.makedirs(d, exist_ok=True)
    model.config.to_json_file(os.path.join(d, "config.json"))


def check_reload(cls, d, ids, want, what):
    for impl in ("eager", "sdpa"):
        m = cls.from_pretrained(d, attn_implementation=impl, dtype=torch.float32).eval()
        err = (logits_of(m, ids) - want).abs().max().item()
        tol = 0.0 if impl == "eager" else 1e-4
        assert err <= tol, f"{what} ({impl}): max |dlogits| {err}"


def gpt2(out, tok):
    g = torch.Generator().manual_seed(1)
    config = gpt2_config()
    model = GPT2LMHeadModel(config).eval()
    init_weights(model, g)
    model.set_attn_implementation("eager")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "head not tied"
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.int64)
    logits = logits_of(model, ids)

    st = os.path.join(out, "hf_safetensors")
    model.save_pretrained(st, safe_serialization=True)
    tok.save(os.path.join(st, "tokenizer.json"))
    sd = {k: v for k, v in state_dict(model).items() if k != "lm_head.weight"}
    n = config.n_positions
    old = {}
    for i in range(config.n_layer):
        old[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        old[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    binp = os.path.join(out, "hf_bin")
    write_config(model, binp)
    torch.save({**sd, **old}, os.path.join(binp, "pytorch_model.bin"))
    tok.save(os.path.join(binp, "tokenizer.json"))
    save_file({"input_ids": ids, "logits": logits}, os.path.join(out, "reference.safetensors"))

    for sub in ("hf_safetensors", "hf_bin"):
        check_reload(GPT2LMHeadModel, os.path.join(out, sub), ids, logits, f"gpt2/{sub}")
    keys = sorted(sd)
    assert "lm_head.weight" not in keys and sd["transformer.h.0.attn.c_attn.weight"].shape == (48, 144)
    print(f"  tiny_gpt2: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters, "
          f"c_attn.weight {list(sd['transformer.h.0.attn.c_attn.weight'].shape)} ([in, out]), "
          f"logits std {logits.std():.3f}")


def pythia_style_config(d):
    """Rewrites a transformers-5 GPT-NeoX config.json in the form Pythia checkpoints carry."""
    p = os.path.join(d, "config.json")
    with open(p) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rotary_pct"] = rope["partial_rotary_factor"]
    c["rotary_emb_base"] = rope["rope_theta"]
    c.pop("attention_bias", None)  # absent from Pythia configs; defaults to true
    with open(p, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)


def gpt_neox(out, tok):
    g = torch.Generator().manual_seed(2)
    config = neox_config()
    model = GPTNeoXForCausalLM(config).eval()
    init_weights(model, g)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.int64)
    logits = logits_of(model, ids)
    # transformers 5 calls the head lm_head; Pythia checkpoints (and save_pretrained) say embed_out.
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in state_dict(model).items()}

    st = os.path.join(out, "hf_safetensors")
    model.save_pretrained(st, safe_serialization=True)
    tok.save(os.path.join(st, "tokenizer.json"))

    hd = config.hidden_size // config.num_attention_heads
    rd = int(hd * 0.25)
    inv_freq = 1.0 / (5000 ** (torch.arange(0, rd, 2, dtype=torch.float) / rd))
    n = config.max_position_embeddings
    old = {}
    for i in range(config.num_hidden_layers):
        p = f"gpt_neox.layers.{i}.attention"
        old[f"{p}.bias"] = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        old[f"{p}.masked_bias"] = torch.tensor(-1e9)
        old[f"{p}.rotary_emb.inv_freq"] = inv_freq.clone()
    binp = os.path.join(out, "hf_bin")
    write_config(model, binp)
    pythia_style_config(binp)
    torch.save({**sd, **old}, os.path.join(binp, "pytorch_model.bin"))
    tok.save(os.path.join(binp, "tokenizer.json"))

    seq_model = GPTNeoXForCausalLM(neox_config(parallel=False)).eval()
    seq_model.load_state_dict(state_dict(model))
    seq_model.set_attn_implementation("eager")
    logits_seq = logits_of(seq_model, ids)
    sq = os.path.join(out, "hf_sequential")
    seq_model.save_pretrained(sq, safe_serialization=True)
    tok.save(os.path.join(sq, "tokenizer.json"))

    save_file({"input_ids": ids, "logits": logits, "logits_sequential": logits_seq},
              os.path.join(out, "reference.safetensors"))
    for sub in ("hf_safetensors", "hf_bin"):
        check_reload(GPTNeoXForCausalLM, os.path.join(out, sub), ids, logits, f"gpt_neox/{sub}")
    check_reload(GPTNeoXForCausalLM, sq, ids, logits_seq, "gpt_neox/hf_sequential")
    d = (logits - logits_seq).abs().max().item()
    assert d > 1e-2, f"parallel and sequential residual barely differ ({d})"
    print(f"  tiny_gpt_neox: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters, "
          f"query_key_value.weight {list(sd['gpt_neox.layers.0.attention.query_key_value.weight'].shape)}, "
          f"rotary dims {rd}/{hd}, logits std {logits.std():.3f}, |parallel - sequential| max {d:.3f}")


def main(out):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tok = build_tokenizer()
    for name, make in (("tiny_gpt2", gpt2), ("tiny_gpt_neox", gpt_neox)):
        d = os.path.join(out, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        make(d, tok)
    print(f"wrote {out}/tiny_gpt2 and {out}/tiny_gpt_neox; verified: every layout reloads to the "
          "reference logits (eager exact, sdpa <= 1e-4)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
