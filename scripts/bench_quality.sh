#!/usr/bin/env bash
# The 8-bit quality table: code × block size × double-quantized scales → bits per weight,
# perplexity change on two English texts against the f32 model, and convert time.
# Model: SmolLM2-135M from its GGUF; texts: the first 8 KB of the 1911 Britannica article and
# the first 2,048 tokens of the held-out Wikipedia text; windows of 512 tokens, stride 256.
#
# Usage: bench_quality.sh OCTET_BIN FIXTURES_DIR WORK_DIR [CODES] [BLOCKS] [DQ]
#   e.g. bench_quality.sh target/release/octet fixtures/generated /tmp/q "fitted linear" "64" "true"
set -euo pipefail
OCTET=${1:?usage: bench_quality.sh OCTET_BIN FIXTURES_DIR WORK_DIR [CODES] [BLOCKS] [DQ]}
FIX=${2:?}
WORK=${3:?}
CODES=${4:-dynamic fitted linear}
BLOCKS=${5:-64 256 4096}
DQS=${6:-false true}
PY=${PY:-.venv/bin/python}
GGUF=$FIX/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$WORK"
head -c 8192 "$FIX/smollm2/britannica-11th.txt" > "$WORK/britannica.txt"
cp "$FIX/quant8/wiki.txt" "$WORK/wiki.txt"

ppl() { # model text -> perplexity
  "$OCTET" eval --model "$1" --data "$2" --ctx 512 --stride 256 --max-tokens 2048 --json \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])'
}
bits() { # folder -> bits per weight of the quantized tensors (bytes, scales, code)
  "$PY" - "$1/model.safetensors" <<'PYEOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
header.pop("__metadata__", None)
size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
elems = 0
stored = 0
for k, v in header.items():
    mod, _, p = k.rpartition(".")
    if p == "weight" and v["dtype"] == "U8":
        numel = 1
        for d in v["shape"]:
            numel *= d
        elems += numel
        stored += sum(size.get(f"{mod}.{q}", 0) for q in
                      ("weight", "absmax", "absmax_q", "absmax_scale", "absmax_offset", "code"))
print(f"{8 * stored / elems:.3f}")
PYEOF
}

# The f32 perplexities may be passed in (BASE_B, BASE_W) when several tables share them.
base_b=${BASE_B:-$(ppl "$GGUF" "$WORK/britannica.txt")}
base_w=${BASE_W:-$(ppl "$GGUF" "$WORK/wiki.txt")}
echo "f32 perplexity: Britannica $base_b, Wikipedia $base_w (SmolLM2-135M, ctx 512, stride 256, 2,048 tokens)"
echo
echo "| code | block | double quant | bits/weight | Δppl Britannica | Δppl Wikipedia | convert s |"
echo "|---|---|---|---|---|---|---|"
for code in $CODES; do
  for block in $BLOCKS; do
    for dq in $DQS; do
      out="$WORK/$code-$block-$dq"
      t0=$(date +%s.%N)
      "$OCTET" convert --model "$GGUF" --out "$out" --code "$code" --block-size "$block" \
        --double-quant "$dq" --force > /dev/null 2>&1
      t1=$(date +%s.%N)
      pb=$(ppl "$out" "$WORK/britannica.txt")
      pw=$(ppl "$out" "$WORK/wiki.txt")
      "$PY" -c "
b,w,pb,pw,t=$base_b,$base_w,$pb,$pw,$t1-$t0
print(f'| $code | $block | $dq | $(bits "$out") | {100*(pb/b-1):+.3f}% | {100*(pw/w-1):+.3f}% | {t:.1f} |')"
      rm -rf "$out"
    done
  done
done
