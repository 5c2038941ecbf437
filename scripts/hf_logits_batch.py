"""Many hf_logits.py jobs in one process (one interpreter start instead of one per job).

Usage: hf_logits_batch.py JOBS.json
JOBS.json is a list of {"model": DIR, "ids": IDS.safetensors, "out": OUT.safetensors,
"adapter": DIR or null}; each OUT gets `logits` (f32 [B, T, V]) as hf_logits.py writes it.
Also prints, as JSON on stdout, peft's default LoRA targets for each model type it loaded.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    from peft import PeftModel
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

    defaults = {}
    for job in json.load(open(sys.argv[1])):
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="eager")
        defaults[model.config.model_type] = targets.get(model.config.model_type)
        if job.get("adapter"):
            model = PeftModel.from_pretrained(model, job["adapter"])
        model.eval()
        ids = load_file(job["ids"])["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().contiguous()
        save_file({"logits": logits}, job["out"])
    print(json.dumps({"lora_defaults": defaults}))


if __name__ == "__main__":
    main()
