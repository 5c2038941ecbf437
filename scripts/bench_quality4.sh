#!/usr/bin/env bash
# The 4-bit quality table: octet's nf4, fp4 and fitted 16-level code (block 64, block scales
# f32 or double-quantized) beside bitsandbytes' nf4 and fp4 round trip of the same Linear
# weights, as perplexity change on two English texts against the unquantized model.
# Model: SmolLM2-135M from its GGUF; texts, windows and tokens as in bench_quality.sh.
# octet keeps the (tied) embedding 8-bit; the bitsandbytes rows keep it in float.
#
# Usage: bench_quality4.sh OCTET_BIN FIXTURES_DIR WORK_DIR [CODES] [DQ]
set -euo pipefail
OCTET=${1:?usage: bench_quality4.sh OCTET_BIN FIXTURES_DIR WORK_DIR [CODES] [DQ]}
FIX=${2:?}
WORK=${3:?}
CODES=${4:-nf4 fp4 fitted}
DQS=${5:-false true}
PY=${PY:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
GGUF=$FIX/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$WORK"
head -c 8192 "$FIX/smollm2/britannica-11th.txt" > "$WORK/britannica.txt"
cp "$FIX/quant8/wiki.txt" "$WORK/wiki.txt"

ppl() { # model text -> perplexity
  "$OCTET" eval --model "$1" --data "$2" --ctx 512 --stride 256 --max-tokens 2048 --json \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])'
}
bits4() { # folder -> bits per weight of the 4-bit Linear weights (codes, scales, code table)
  "$PY" - "$1/model.safetensors" <<'PYEOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
header.pop("__metadata__", None)
size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
elems = stored = 0
for k, v in header.items():
    mod, _, p = k.rpartition(".")
    code = header.get(f"{mod}.code")
    if p == "weight" and v["dtype"] == "U8" and code and code["shape"] == [16]:
        numel = 2
        for d in v["shape"]:
            numel *= d
        elems += numel
        stored += sum(size.get(f"{mod}.{q}", 0) for q in
                      ("weight", "absmax", "absmax_q", "absmax_scale", "absmax_offset", "code"))
print(f"{8 * stored / elems:.3f}")
PYEOF
}
row() { # label folder bits seconds
  local pb pw
  pb=$(ppl "$2" "$WORK/britannica.txt")
  pw=$(ppl "$2" "$WORK/wiki.txt")
  "$PY" -c "
b,w,pb,pw=$base_b,$base_w,$pb,$pw
print(f'| $1 | $3 | {100*(pb/b-1):+.2f}% | {100*(pw/w-1):+.2f}% | $4 |')"
}

base_b=${BASE_B:-$(ppl "$GGUF" "$WORK/britannica.txt")}
base_w=${BASE_W:-$(ppl "$GGUF" "$WORK/wiki.txt")}
echo "unquantized perplexity: Britannica $base_b, Wikipedia $base_w (SmolLM2-135M, ctx 512, stride 256, 2,048 tokens)"
echo
echo "| weights (Linear, block 64) | bits/weight | Δppl Britannica | Δppl Wikipedia | convert s |"
echo "|---|---|---|---|---|"
for code in $CODES; do
  for dq in $DQS; do
    out="$WORK/octet-$code-$dq"
    t0=$(date +%s.%N)
    "$OCTET" convert --model "$GGUF" --out "$out" --bits 4 --code "$code" --block-size 64 \
      --double-quant "$dq" --force > /dev/null 2>&1
    t1=$(date +%s.%N)
    row "octet $code, double quant $dq" "$out" "$(bits4 "$out")" "$("$PY" -c "print(f'{$t1-$t0:.1f}')")"
    rm -rf "$out"
  done
done

# bitsandbytes: its 4-bit round trip of every *_proj weight of the unquantized folder.
float="$WORK/float"
rm -rf "$float"
"$OCTET" convert --model "$GGUF" --out "$float" --force \
  --skip q_proj --skip k_proj --skip v_proj --skip o_proj \
  --skip gate_proj --skip up_proj --skip down_proj --skip embed_tokens > /dev/null 2>&1
for qt in nf4 fp4; do
  for dq in $DQS; do
    out="$WORK/bnb-$qt-$dq"
    rm -rf "$out"
    flag=""
    [ "$dq" = true ] && flag=dq
    "$PY" "$HERE/bnb4_roundtrip_folder.py" "$float" "$out" "$qt" 64 $flag > /dev/null
    bits=4.500
    [ "$dq" = true ] && bits=4.127
    row "bitsandbytes $qt, compress_statistics $dq" "$out" "$bits" "-"
    rm -rf "$out"
  done
done
rm -rf "$float"
