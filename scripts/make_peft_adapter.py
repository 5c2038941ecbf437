"""Makes a PEFT LoRA adapter on a Hugging Face base with peft itself (fixed seed), including an
adapter on the embedding, with non-zero B so it changes the logits; writes the adapter folder
and the adapted model's logits for the given ids.

Usage: make_peft_adapter.py BASE_DIR ADAPTER_OUT IDS.safetensors LOGITS_OUT.safetensors
                            [--bin] [--modules-to-save NAME,...]

--bin writes the older pickled adapter_model.bin instead of adapter_model.safetensors.
--modules-to-save trains full copies of the named modules too (peft's modules_to_save); their
copies are moved off the base values with seeded noise, so they change the logits.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_dir")
    p.add_argument("adapter_out")
    p.add_argument("ids_path")
    p.add_argument("logits_out")
    p.add_argument("--bin", action="store_true")
    p.add_argument("--modules-to-save", default=None)
    a = p.parse_args(sys.argv[1:])
    base_dir, adapter_out, ids_path, logits_out = a.base_dir, a.adapter_out, a.ids_path, a.logits_out
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    to_save = a.modules_to_save.split(",") if a.modules_to_save else None
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "fc_in", "wte"], lora_dropout=0.0,
                     init_lora_weights=False, task_type="CAUSAL_LM", modules_to_save=to_save)
    model = get_peft_model(model, cfg)
    if to_save:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".modules_to_save." in name:
                    param.add_(0.05 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(adapter_out, safe_serialization=not a.bin)
    ids = load_file(ids_path)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file({"logits": logits}, logits_out)


if __name__ == "__main__":
    main()
