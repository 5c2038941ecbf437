"""Merges a PEFT LoRA adapter into its Hugging Face base with peft's own merge_and_unload and
writes the merged model's logits for given input ids (the oracle for `octet merge`).

Usage: peft_merge_logits.py BASE_DIR ADAPTER_DIR IDS.safetensors OUT.safetensors [WEIGHTS_OUT]
IDS.safetensors holds `input_ids` (int64 [B, T]); OUT gets `logits` (f32 [B, T, V]).
With WEIGHTS_OUT, the merged model's state dict is also saved there (f32 safetensors).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    base_dir, adapter_dir, ids_path, out_path = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.eval()
    ids = load_file(ids_path)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file({"logits": logits}, out_path)
    if len(sys.argv) > 5:
        state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, sys.argv[5])


if __name__ == "__main__":
    main()
