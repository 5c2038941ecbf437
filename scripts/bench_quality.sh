#!/usr/bin/env bash
# The 8-bit quality tables:
# 1. code × block size × double-quantized scales, rounded to nearest (--calibrate none) → bits
#    per weight, perplexity change on two English texts against the f32 model, convert time;
# 2. the default conversion (no flags: linear code, block 64, double-quantized scales, GPTQ on
#    the built-in calibration text) beside the same scheme rounded to nearest, on the long
#    texts, with the KL divergence of each from the f32 model.
# Model: SmolLM2-135M from its GGUF; texts: the first 8 KB of the 1911 Britannica article and
# the first 2,048 tokens of the held-out Wikipedia text; windows of 512 tokens, stride 256.
#
# Usage: bench_quality.sh OCTET_BIN FIXTURES_DIR WORK_DIR [CODES] [BLOCKS] [DQ]
#   e.g. bench_quality.sh target/release/octet fixtures/generated /tmp/q "fitted linear" "64" "true"
#   (CODES "" skips table 1)
set -euo pipefail
OCTET=${1:?usage: bench_quality.sh OCTET_BIN FIXTURES_DIR WORK_DIR [CODES] [BLOCKS] [DQ]}
FIX=${2:?}
WORK=${3:?}
CODES=${4-dynamic fitted linear}
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
        --double-quant "$dq" --calibrate none --force > /dev/null 2>&1
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

# Table 2: long texts. Britannica: its first 20,480 tokens in disjoint 512-token windows;
# Wikipedia: all of it, windows of 512, stride 256; KL and top-token agreement on the
# Wikipedia text in disjoint windows, against the f32 model.
long_ppl() { # model text extra-args -> perplexity
  "$OCTET" eval --model "$1" --data "$2" --ctx 512 $3 --json 2>/dev/null \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])'
}
BRIT="$FIX/smollm2/britannica-11th.txt"
lb=$(long_ppl "$GGUF" "$BRIT" "--max-tokens 20480")
lw=$(long_ppl "$GGUF" "$WORK/wiki.txt" "--stride 256")
echo
echo "f32 perplexity on the long texts: Britannica $lb, Wikipedia $lw"
echo
echo "| conversion | bits/weight | Δppl Britannica | Δppl Wikipedia | mean KL | top token agrees | convert s |"
echo "|---|---|---|---|---|---|---|"
for cal in builtin none; do
  out="$WORK/default-$cal"
  t0=$(date +%s.%N)
  "$OCTET" convert --model "$GGUF" --out "$out" --calibrate "$cal" --force > /dev/null 2>&1
  t1=$(date +%s.%N)
  pb=$(long_ppl "$out" "$BRIT" "--max-tokens 20480")
  pw=$(long_ppl "$out" "$WORK/wiki.txt" "--stride 256")
  kl=$("$OCTET" eval --model "$GGUF" --compare "$out" --kl --data "$WORK/wiki.txt" --ctx 512 \
        --json 2>/dev/null | "$PY" -c 'import json,sys; k=json.load(sys.stdin)["compare"]["kl"]; print(k["kl_mean"], k["top1_agreement"])')
  label=$([ "$cal" = builtin ] && echo "default (GPTQ, built-in text)" || echo "--calibrate none (to nearest)")
  "$PY" -c "
b,w,pb,pw,t=$lb,$lw,$pb,$pw,$t1-$t0
kl,agree='$kl'.split()
print(f'| $label | $(bits "$out") | {100*(pb/b-1):+.3f}% | {100*(pw/w-1):+.3f}% | {float(kl):.2e} | {100*float(agree):.2f}% | {t:.1f} |')"
  rm -rf "$out"
done
