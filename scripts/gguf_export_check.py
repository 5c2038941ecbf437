"""Independent checks of the GGUF files octet exports (the oracles of tests/it/gguf_export.rs).

Usage:
  gguf_export_check.py logits SOURCE_DIR FILE.gguf IDS.safetensors ROUND [source-config]
      transformers loads FILE.gguf (from_pretrained(dir, gguf_file=...)) and the source Hugging
      Face folder (with `source-config`, FILE.gguf's tensors with the source's config: for
      architectures whose metadata transformers' GGUF loader reads incompletely); the source's matrices are rounded as the file stores them (ROUND: f16, bf16 or
      none) and any sliding window is dropped (llama.cpp's llama architecture has none).
      Prints {"same_weights": max |diff| against the rounded source,
              "source": max |diff| against the source as it is, "logit_scale": max |logit|,
              "config_from": "gguf", or "source" where transformers could not derive the config
              from the file's metadata and was given the source's}.
  gguf_export_check.py compare OURS.gguf THEIRS.gguf
      Metadata keys, tensor names, types and shapes of both files (gguf's reader), and the tensors
      whose bytes differ. Prints JSON.
  gguf_export_check.py cast OURS.gguf F32.gguf
      Every tensor of OURS equals the f32 file's tensor converted to OURS's type by gguf's
      quantizer (numpy's astype for F16). Prints the names that differ.
  gguf_export_check.py lora BASE.gguf ADAPTER.gguf MERGED.gguf PEFT_DIR N_HEAD N_KV_HEAD
      The adapter's tensors against PEFT's A and B (B's q/k rows permuted with llama.cpp's
      formula when N_HEAD > 0), then base + alpha/r * lora_b @ lora_a in numpy against the merged
      file, per target. Prints JSON.
  gguf_export_check.py round SRC_DIR OUT_DIR IDS.safetensors CTX ROUND...
      The weights an export in each ROUND (f16, bf16 or q8_0) stores, computed from the source
      Hugging Face folder without any GGUF file: every matrix cast by torch (f16, bf16) or
      quantized and de-quantized by gguf's Q8_0 (rows of a multiple of 32, else f16, as octet
      and llama.cpp's converter fall back), vectors kept f32. Writes each with the source's
      config as the Hugging Face folder OUT_DIR/ROUND, and prints transformers' perplexity of
      the ids (windows of CTX tokens, side by side) on the source and on each rounding:
      {"source": ppl, ROUND: ppl, ...}.
  gguf_export_check.py make-adapter BASE_DIR OUT_DIR
      A PEFT LoRA adapter (seed 11, r 4, alpha 8, random non-zero A and B) on every attention and
      MLP projection of a Llama-family base.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import gguf  # noqa: E402


def deq(t):
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(x) for x in reversed(t.shape)]
    )


def fields(r):
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001
            v = None
        out[k] = v
    return out


def cmd_logits(src, path, ids_path, rnd, how="auto"):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = load_file(ids_path)["input_ids"]
    cfg = AutoConfig.from_pretrained(src)
    load = dict(gguf_file=os.path.basename(path), dtype=torch.float32, attn_implementation="eager")
    try:
        if how == "source-config":
            raise ValueError("the source's config is asked for")
        g = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), **load)
        config_from = "gguf"
    except Exception:  # noqa: BLE001
        # transformers derives some configs incompletely (no vocab_size without a tokenizer,
        # no key_length): then only the tensors come from the file.
        g = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), config=cfg, **load)
        config_from = "source"
    for k in ("sliding_window", "use_sliding_window"):
        if hasattr(cfg, k):
            setattr(cfg, k, None if k == "sliding_window" else False)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
    m = AutoModelForCausalLM.from_pretrained(src, config=cfg, dtype=torch.float32,
                                             attn_implementation="eager")
    with torch.no_grad():
        want_src = m(input_ids=ids).logits
        if rnd != "none":
            dt = {"f16": torch.float16, "bf16": torch.bfloat16}[rnd]
            for p in m.parameters():
                if p.dim() >= 2:
                    p.copy_(p.to(dt).float())
        want = m(input_ids=ids).logits
        got = g(input_ids=ids).logits
    print(json.dumps({"same_weights": float((got - want).abs().max()),
                      "source": float((got - want_src).abs().max()),
                      "logit_scale": float(want_src.abs().max()), "config_from": config_from}))


def cmd_compare(ours, theirs):
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    fa, fb = fields(a), fields(b)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    differ = [n for n in ta if n in tb and (ta[n].tensor_type != tb[n].tensor_type
                                           or bytes(ta[n].data.tobytes()) != bytes(tb[n].data.tobytes()))]
    rel = {n: float(np.max(np.abs(deq(ta[n]) - deq(tb[n])) / np.maximum(np.abs(deq(tb[n])), 1e-30)))
           for n in differ if ta[n].tensor_type == tb[n].tensor_type}
    values = [k for k in fa if k in fb and k not in ("general.name",) and fa[k] != fb[k]]
    print(json.dumps({
        "keys_only_ours": sorted(set(fa) - set(fb)),
        "keys_only_theirs": sorted(set(fb) - set(fa)),
        "values_differ": sorted(values),
        "tensors_only_ours": sorted(set(ta) - set(tb)),
        "tensors_only_theirs": sorted(set(tb) - set(ta)),
        "tensors_differ": sorted(differ),
        "max_rel_diff": rel,
        "types": {n: t.tensor_type.name for n, t in ta.items()},
    }))


def cmd_cast(ours, f32):
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(f32)
    tb = {t.name: t for t in b.tensors}
    bad = []
    for t in a.tensors:
        src = deq(tb[t.name])
        want = gguf.quants.quantize(src, t.tensor_type)
        if want.tobytes() != t.data.tobytes():
            bad.append(t.name)
    print(json.dumps({"differ": bad, "checked": len(a.tensors)}))


def permute(w, n_head):
    # llama.cpp's LlamaModel.permute, on rows.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def cmd_lora(base, adapter, merged, peft_dir, n_head, n_kv):
    from safetensors.numpy import load_file

    n_head, n_kv = int(n_head), int(n_kv)
    ad = gguf.GGUFReader(adapter)
    meta = fields(ad)
    alpha = float(meta["adapter.lora.alpha"])
    cfg = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    peft = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    lora = {t.name: deq(t) for t in ad.tensors}
    base_t = {t.name: deq(t) for t in gguf.GGUFReader(base).tensors}
    merged_t = {t.name: deq(t) for t in gguf.GGUFReader(merged).tensors}
    targets = sorted({n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")})
    # PEFT names: base_model.model.<path>.lora_A.weight; llama.cpp names via the blk table.
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    tensor_diff, merge_diff = 0.0, 0.0
    for raw in targets:
        _, layer, part, _ = raw.split(".")
        path = f"base_model.model.model.layers.{layer}.{parts[part]}"
        A = peft[f"{path}.lora_A.weight"].astype(np.float32)
        B = peft[f"{path}.lora_B.weight"].astype(np.float32)
        heads = n_head if part == "attn_q" else n_kv if part == "attn_k" else 0
        if heads > 0:
            B = permute(B, heads)
        la, lb = lora[raw + ".lora_a"], lora[raw + ".lora_b"]
        tensor_diff = max(tensor_diff, float(np.abs(la - A).max()), float(np.abs(lb - B).max()))
        r = la.shape[0]
        w = base_t[raw] + (alpha / r) * (lb @ la)
        merge_diff = max(merge_diff, float(np.abs(w - merged_t[raw]).max()))
    scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    print(json.dumps({
        "targets": len(targets), "tensor_diff": tensor_diff, "merge_diff": merge_diff,
        "general.type": meta.get("general.type"), "adapter.type": meta.get("adapter.type"),
        "alpha_over_r": alpha / cfg["r"], "peft_scale": float(scale),
    }))


def rounded(w, rnd):
    import torch

    if w.dim() < 2:
        return w
    if rnd == "q8_0" and w.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
        return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape))
    dt = {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.float16}[rnd]
    return w.to(dt).float()


def cmd_round(src, out, ids_path, ctx, *rounds):
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(ids_path)["input_ids"]
    ctx = int(ctx)

    def ppl(d):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        nll, n = 0.0, 0
        with torch.no_grad():
            for b in range(0, ids.shape[1], ctx):
                w = ids[:, b:b + ctx]
                if w.shape[1] < 2:
                    continue
                logp = torch.log_softmax(m(input_ids=w).logits[:, :-1].double(), -1)
                nll -= float(logp.gather(-1, w[:, 1:, None]).sum())
                n += w.shape[1] - 1
        return float(np.exp(nll / n))

    sd = load_file(os.path.join(src, "model.safetensors"))
    result = {"source": ppl(src)}
    for rnd in rounds:
        d = os.path.join(out, rnd)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith((".safetensors", ".bin")):
                shutil.copy(os.path.join(src, f), d)
        save_file({k: rounded(v.float(), rnd).contiguous() for k, v in sd.items()},
                  os.path.join(d, "model.safetensors"))
        result[rnd] = ppl(d)
    print(json.dumps(result))


def cmd_make_adapter(base, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj"])
    get_peft_model(m, cfg).save_pretrained(out)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"logits": cmd_logits, "compare": cmd_compare, "cast": cmd_cast, "lora": cmd_lora,
     "make-adapter": cmd_make_adapter, "round": cmd_round}[cmd](*args)


if __name__ == "__main__":
    main()
