"""A random Llama-2-7B-shaped Hugging Face folder (hidden 4096, MLP 11008, 32 heads, vocab 32000)
with fewer blocks, for measuring export time and peak memory at full width.

Usage: gen_llama7b_shape.py OUT_DIR LAYERS

Weights are f16 N(0, 0.02) (seed 0), written one tensor at a time into one safetensors file per
block, so generating it needs about one block (0.4 GB) of memory beyond the embedding and head.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 32000


def main(out, layers):
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (0.02 * torch.randn(*shape, generator=g)).half()  # noqa: E731
    index = {}

    def write(name, tensors):
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})

    write("top.safetensors", {
        "model.embed_tokens.weight": rnd(VOCAB, HIDDEN),
        "lm_head.weight": rnd(VOCAB, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN).half(),
    })
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{m}_proj.weight": rnd(HIDDEN, HIDDEN) for m in "qkvo"}
        t[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        t[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        t[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN).half()
        t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN).half()
        write(f"layer{i}.safetensors", t)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
        }, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]))
