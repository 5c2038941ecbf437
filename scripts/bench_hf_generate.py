"""transformers reference for `make bench`: KV-cached greedy generation on a random GPT-J of
true width (the shape benches/generate.rs gives octet). Prints one JSON line: the median time
of a prefill (generate with one new token) and of a full run of NEW tokens, the decode rate
derived from them, and peak RSS (VmHWM) of this process.

Usage: bench_hf_generate.py LAYERS VOCAB BATCH PROMPT NEW REPEATS
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import peak_rss_mib  # noqa: E402
from transformers import GPTJConfig, GPTJForCausalLM  # noqa: E402


def main():
    layers, vocab, batch, prompt, new, repeats = (int(v) for v in sys.argv[1:7])
    torch.manual_seed(0)
    cfg = GPTJConfig(n_embd=4096, n_head=16, rotary_dim=64, n_layer=layers, vocab_size=vocab,
                     n_positions=2048, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                     tie_word_embeddings=False)
    model = GPTJForCausalLM(cfg).eval()
    ids = torch.randint(vocab, (batch, prompt))

    def run(n):
        # min_new_tokens and no EOS: exactly n tokens, as octet's generate_batch does.
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, use_cache=True)
        assert out.shape == (batch, prompt + n), out.shape
        return time.perf_counter() - t

    run(2)  # warm-up
    prefill = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new) for _ in range(repeats))
    print(json.dumps({"prefill_s": prefill, "total_s": total,
                      "decode_tok_s": batch * (new - 1) / max(total - prefill, 1e-9),
                      "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
