"""transformers + peft reference for `make bench`: LoRA (r=8, q_proj/v_proj) training steps on a
random GPT-J of true width with gradient checkpointing. Prints one JSON line: median step time
and peak RSS (VmHWM) of this process.

Usage: bench_hf_train.py LAYERS VOCAB BATCH SEQ f32|bf16 STEPS [EMBD [DEVICE]]

On a GPU (DEVICE cuda or cuda:N) the model is created there in the given dtype, and
`peak_gpu_mib` is the device's used memory after the steps (total - free, as octet measures it).
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import peak_rss_mib  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPTJConfig, GPTJForCausalLM  # noqa: E402


def main():
    layers, vocab, batch, seq = (int(v) for v in sys.argv[1:5])
    dtype = torch.bfloat16 if sys.argv[5] == "bf16" else torch.float32
    steps = int(sys.argv[6])
    embd = int(sys.argv[7]) if len(sys.argv) > 7 else 4096
    device = torch.device(sys.argv[8] if len(sys.argv) > 8 else "cpu")
    torch.manual_seed(0)
    cfg = GPTJConfig(n_embd=embd, n_head=max(embd // 256, 1), rotary_dim=64, n_layer=layers, vocab_size=vocab,
                     n_positions=2048, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=False)
    if device.type == "cuda":
        # Created on the GPU in the target dtype: a 6B float32 copy on the host would take minutes.
        torch.set_default_dtype(dtype)
        with device:
            model = GPTJForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    else:
        model = GPTJForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(vocab, (batch, seq)).to(device)
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - t)
    peak_gpu = None
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak_gpu = (total - free) / 2**20
    print(json.dumps({"step_s": statistics.median(times), "peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_gpu}))


if __name__ == "__main__":
    main()
