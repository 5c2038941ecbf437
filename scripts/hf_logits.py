"""Logits of a Hugging Face causal LM folder for given input ids (the oracle for octet tests).

Usage: hf_logits.py MODEL_DIR IDS.safetensors OUT.safetensors [ADAPTER_DIR]
IDS.safetensors holds `input_ids` (int64 [B, T]); OUT gets `logits` (f32 [B, T, V]).
With ADAPTER_DIR, a PEFT adapter is loaded on top of the model first.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    model_dir, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if len(sys.argv) > 4:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, sys.argv[4])
    model.eval()
    ids = load_file(ids_path)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file({"logits": logits}, out_path)


if __name__ == "__main__":
    main()
