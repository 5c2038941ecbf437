"""Makes a PEFT LoRA adapter on a Hugging Face base with peft itself (fixed seed), including an
adapter on the embedding, with non-zero B so it changes the logits; writes the adapter folder
and the adapted model's logits for the given ids.

Usage: make_peft_adapter.py BASE_DIR ADAPTER_OUT IDS.safetensors LOGITS_OUT.safetensors
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    base_dir, adapter_out, ids_path, logits_out = sys.argv[1:5]
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "fc_in", "wte"], lora_dropout=0.0,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.eval()
    model.save_pretrained(adapter_out)
    ids = load_file(ids_path)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file({"logits": logits}, logits_out)


if __name__ == "__main__":
    main()
