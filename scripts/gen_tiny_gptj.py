"""Writes a tiny random GPT-J in every checkpoint layout octet loads, plus golden logits.

Usage: gen_tiny_gptj.py OUT_DIR

Everything is made locally (no model hub) with fixed seeds and in f32:

  OUT_DIR/hf_safetensors/          config.json + model.safetensors        (save_pretrained)
  OUT_DIR/hf_bin/                  config.json + pytorch_model.bin        (torch.save(state_dict))
                                   plus the old `attn.bias` / `attn.masked_bias` buffers that real
                                   GPT-J checkpoints carry and a loader must ignore
  OUT_DIR/hf_sharded_safetensors/  model-0000k-of-0000n.safetensors + model.safetensors.index.json
  OUT_DIR/hf_sharded_bin/          pytorch_model-0000k-of-00002.bin + pytorch_model.bin.index.json
                                   (with the old buffers too)
  OUT_DIR/gptj8bit/                config.json + pytorch_model.bin in the hivemind "GPT-J 8-bit"
                                   layout: every Linear/Embedding weight as `<path>.weight` uint8
                                   [out, in], `<path>.absmax` f32 [ceil(numel/4096)], `<path>.code`
                                   f32 [256] (bitsandbytes quantize_blockwise, block 4096); biases,
                                   LayerNorms and the old buffers unchanged
  OUT_DIR/reference.safetensors    input_ids i64 [2, 13]; logits f32 [2, 13, 301] of the f32 model;
                                   logits_dequant_b4096 / logits_dequant_b64 of the model with every
                                   quantizable weight replaced by its bitsandbytes round trip;
                                   deq_b4096.<path>.weight = bitsandbytes' dequantization of the
                                   (q, absmax, code) stored in gptj8bit/

Model: n_layer 2, n_embd 72, n_head 4 (head_dim 18), rotary_dim 8, n_inner 4*72, vocab 301 (odd, so
quantization blocks are partial), n_positions 64, gelu_new, untied lm_head (which has a bias), no
dropout. Weights are re-initialised with larger spreads than the default so logits differ a lot.
Reference logits use the eager attention path; the script reloads every layout and checks it.
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from transformers import GPTJConfig, GPTJForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SEED = 0
BATCH, SEQ = 2, 13
QUANT_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out", "wte", "lm_head")


def make_config():
    return GPTJConfig(
        vocab_size=301,
        n_positions=64,
        n_embd=72,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_inner=None,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
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
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            std = 0.2 if leaf == "weight" else 0.05
            p.copy_(std * torch.randn(p.shape, generator=g))
        else:
            raise RuntimeError(f"unexpected parameter {name}")


def quantizable(sd):
    """Names (without `.weight`) of every Linear/Embedding weight the 8-bit layout quantizes."""
    return [k[: -len(".weight")] for k in sd if k.endswith(".weight") and k.split(".")[-2] in QUANT_SUFFIXES]


def old_buffers(config):
    """The persistent buffers transformers 4.x GPT-J attention had (and real checkpoints carry)."""
    n = config.n_positions
    mask = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
    out = {}
    for i in range(config.n_layer):
        out[f"transformer.h.{i}.attn.bias"] = mask.clone()
        out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    return out


@torch.no_grad()
def logits_of(model, ids):
    return model(input_ids=ids).logits.float().contiguous()


@torch.no_grad()
def with_weights(model, replace):
    """A deep copy of `model` with some `<path>.weight` tensors replaced."""
    import copy

    m = copy.deepcopy(model)
    sd = m.state_dict()
    for k, v in replace.items():
        sd[k].copy_(v)
    return m


def write_config(model, d):
    os.makedirs(d, exist_ok=True)
    model.config.to_json_file(os.path.join(d, "config.json"))


def save_sharded_bin(sd, d, groups):
    """torch.save shards + a pytorch_model.bin.index.json, `groups` = list of key predicates."""
    os.makedirs(d, exist_ok=True)
    n = len(groups)
    weight_map, total, seen = {}, 0, set()
    for i, pred in enumerate(groups):
        fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        shard = {k: v.contiguous() for k, v in sd.items() if k not in seen and pred(k)}
        seen.update(shard)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        torch.save(shard, os.path.join(d, fname))
    assert seen == set(sd), set(sd) - seen
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return n


def main(out):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    os.makedirs(out, exist_ok=True)
    for sub in ("hf_safetensors", "hf_bin", "hf_sharded_safetensors", "hf_sharded_bin", "gptj8bit"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)

    config = make_config()
    model = GPTJForCausalLM(config).eval()
    init_weights(model, g)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.int64)
    logits = logits_of(model, ids)

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    extra = old_buffers(config) if not any(k.endswith("attn.bias") for k in sd) else {}

    # 1. HF layouts
    model.save_pretrained(os.path.join(out, "hf_safetensors"), safe_serialization=True)
    write_config(model, os.path.join(out, "hf_bin"))
    torch.save({**sd, **extra}, os.path.join(out, "hf_bin", "pytorch_model.bin"))
    model.save_pretrained(os.path.join(out, "hf_sharded_safetensors"), safe_serialization=True,
                          max_shard_size="200KB")
    write_config(model, os.path.join(out, "hf_sharded_bin"))
    n_bin_shards = save_sharded_bin(
        {**sd, **extra}, os.path.join(out, "hf_sharded_bin"),
        [lambda k: k.startswith(("transformer.wte.", "transformer.h.0.")), lambda k: True],
    )

    # 2-3. 8-bit layout and de-quantized references
    ref = {"input_ids": ids, "logits": logits}
    q8 = {}
    for block in (4096, 64):
        deq = {}
        for path in quantizable(sd):
            w = sd[path + ".weight"].float().contiguous()
            q, st = bnbF.quantize_blockwise(w, blocksize=block)
            d = bnbF.dequantize_blockwise(q, absmax=st.absmax, code=st.code, blocksize=block)
            assert q.dtype == torch.uint8 and q.shape == w.shape and d.shape == w.shape
            deq[path + ".weight"] = d
            if block == 4096:
                q8[path + ".weight"] = q.contiguous()
                q8[path + ".absmax"] = st.absmax.float().contiguous()
                q8[path + ".code"] = st.code.float().contiguous()
                ref[f"deq_b4096.{path}.weight"] = d.contiguous()
        ref[f"logits_dequant_b{block}"] = logits_of(with_weights(model, deq), ids)
    for k, v in {**sd, **extra}.items():
        if k not in q8 and not (k.endswith(".weight") and k[: -len(".weight")] in quantizable(sd)):
            q8[k] = v  # biases, LayerNorms, old buffers
    write_config(model, os.path.join(out, "gptj8bit"))
    torch.save(q8, os.path.join(out, "gptj8bit", "pytorch_model.bin"))
    save_file(ref, os.path.join(out, "reference.safetensors"))

    verify(out, ids, ref, q8)
    summary(out, sd, extra, q8, ref, n_bin_shards)


@torch.no_grad()
def verify(out, ids, ref, q8):
    """Reload every layout and check it reproduces the reference."""
    for sub in ("hf_safetensors", "hf_bin", "hf_sharded_safetensors", "hf_sharded_bin"):
        for impl in ("eager", "sdpa"):
            m = GPTJForCausalLM.from_pretrained(os.path.join(out, sub), attn_implementation=impl,
                                                dtype=torch.float32).eval()
            err = (logits_of(m, ids) - ref["logits"]).abs().max().item()
            tol = 0.0 if impl == "eager" else 1e-4
            assert err <= tol, f"{sub} ({impl}): max |dlogits| {err}"
    loaded = torch.load(os.path.join(out, "gptj8bit", "pytorch_model.bin"), weights_only=True)
    for k, v in ref.items():
        if k.startswith("deq_b4096."):
            p = k[len("deq_b4096."): -len(".weight")]
            d = bnbF.dequantize_blockwise(loaded[p + ".weight"], absmax=loaded[p + ".absmax"],
                                          code=loaded[p + ".code"], blocksize=4096)
            assert torch.equal(d, v), k
    assert load_file(os.path.join(out, "reference.safetensors")).keys() == ref.keys()
    d = (ref["logits_dequant_b4096"] - ref["logits"]).abs().max().item()
    assert 0 < d < 1.0, d


def summary(out, sd, extra, q8, ref, n_bin_shards):
    n_st = len([f for f in os.listdir(os.path.join(out, "hf_sharded_safetensors")) if f.endswith(".safetensors")])
    nparam = sum(v.numel() for v in sd.values())
    print(f"wrote {out}")
    print(f"  tiny GPT-J: {len(sd)} tensors, {nparam} parameters; old buffers added: {sorted(extra)[:2]}...")
    print(f"  hf_safetensors, hf_bin, hf_sharded_safetensors ({n_st} shards), hf_sharded_bin ({n_bin_shards} shards)")
    print(f"  gptj8bit/pytorch_model.bin: {len(q8)} tensors, e.g.")
    for k in ("transformer.wte.weight", "transformer.wte.absmax", "transformer.wte.code",
              "transformer.h.0.mlp.fc_in.weight", "transformer.h.0.mlp.fc_in.absmax", "lm_head.bias"):
        print(f"    {k}: {q8[k].dtype} {list(q8[k].shape)}")
    print("  reference.safetensors:")
    for k, v in ref.items():
        if not k.startswith("deq_"):
            print(f"    {k}: {v.dtype} {list(v.shape)}")
    print(f"    deq_b4096.<path>.weight x{sum(k.startswith('deq_') for k in ref)}")
    for b in (4096, 64):
        d = (ref[f"logits_dequant_b{b}"] - ref["logits"]).abs()
        print(f"  |logits_dequant_b{b} - logits|: max {d.max():.4f} mean {d.mean():.4f}"
              f" (logits std {ref['logits'].std():.3f})")
    print("  verified: all HF layouts reload to the same logits (eager exact, sdpa ≤1e-4); 8-bit round trip exact")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
