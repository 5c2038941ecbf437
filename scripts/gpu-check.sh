#!/usr/bin/env bash
# The GPU check: proves on a machine with a GPU what a CPU-only machine cannot, in one short,
# pasteable report. See docs/gpu.md.
#
#   scripts/gpu-check.sh --prepare   (build machine: Rust + the project venv) builds the octet
#                                    binary, the test binary and the bench binaries and stages
#                                    them with the fixtures and scripts they need in a bundle
#                                    folder (default target/gpu-check; --bundle DIR)
#   scripts/gpu-check.sh             (GPU machine: python3 with torch 2.11.0, transformers, peft;
#                                    no Rust needed) runs the check from the bundle
#   scripts/gpu-check.sh --dry-run   the same on the CPU, on a small shape (prepares first when
#                                    the bundle is missing), so a first GPU run does not fail
#                                    on a typo
#
# Environment: PYTHON (default python3 when it imports torch, else the project venv's),
# GPU_CHECK_SHAPES (batch x seq list, default 1x256,4x512,8x2048), GPU_CHECK_DEVICE (cuda).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
mode=run
bundle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) mode=prepare ;;
        --dry-run) mode=dry-run ;;
        --bundle) bundle="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
# Run from inside a bundle (the script is staged in it), or from the repository.
if [ -z "$bundle" ]; then
    if [ -x "$here/bin/octet" ]; then bundle="$here"; else bundle="$root/target/gpu-check"; fi
fi

# The executable cargo built for target NAME of KIND (bin, test, bench), from its JSON messages
# on stdin (read with the project venv's Python, which the build machine has anyway).
executable_of() {
    "$root/.venv/bin/python" -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
found = ""
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind in t.get("kind", []) and t.get("name") == name:
        found = m["executable"]
print(found)' "$1" "$2"
}

prepare() {
    cd "$root"
    export LIBTORCH="${LIBTORCH:-$root/.venv/lib/python3.11/site-packages/torch}"
    echo "gpu-check: building against $LIBTORCH" >&2
    cargo build --release >&2
    local test_exe bench_train bench_generate
    test_exe="$(cargo test --release --no-run --message-format=json 2>/dev/null | executable_of test it)"
    bench_train="$(cargo bench --no-run --message-format=json --bench train 2>/dev/null | executable_of bench train)"
    bench_generate="$(cargo bench --no-run --message-format=json --bench generate 2>/dev/null | executable_of bench generate)"
    for f in "$test_exe" "$bench_train" "$bench_generate"; do
        [ -x "$f" ] || { echo "gpu-check: a build product is missing ($f)" >&2; exit 1; }
    done
    rm -rf "$bundle"
    mkdir -p "$bundle/bin" "$bundle/scripts" "$bundle/fixtures/tiny_gptj"
    cp target/release/octet "$bundle/bin/octet"
    cp "$test_exe" "$bundle/bin/it"
    cp "$bench_train" "$bundle/bin/bench-train"
    cp "$bench_generate" "$bundle/bin/bench-generate"
    strip "$bundle"/bin/* 2>/dev/null || true
    cp scripts/gpu-check.sh scripts/bench_hf_train.py scripts/bench_hf_generate.py \
        scripts/bench_common.py scripts/bnb_cuda_adam8bit.py "$bundle/scripts/"
    cp -r fixtures/generated/tiny_gptj/hf_safetensors "$bundle/fixtures/tiny_gptj/"
    # The script at the bundle's top finds everything beside it.
    cp scripts/gpu-check.sh "$bundle/gpu-check.sh"
    echo "gpu-check: bundle ready in $bundle ($(du -sh "$bundle" | cut -f1)); copy it to the GPU machine" >&2
}

if [ "$mode" = prepare ]; then
    prepare
    exit 0
fi
if [ ! -x "$bundle/bin/octet" ]; then
    if [ "$mode" = dry-run ]; then prepare; else
        echo "gpu-check: no bundle at $bundle: run scripts/gpu-check.sh --prepare on the build machine" >&2
        exit 1
    fi
fi

if [ -z "${PYTHON:-}" ]; then
    if python3 -c 'import torch' 2>/dev/null; then PYTHON=python3; else PYTHON="$root/.venv/bin/python"; fi
fi
torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OCTET_PYTHON="$PYTHON" OCTET_SCRIPTS="$bundle/scripts" OCTET_FIXTURES="$bundle/fixtures"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

if [ "$mode" = dry-run ]; then
    device=cpu
    shapes="${GPU_CHECK_SHAPES:-1x32,2x64}"
    # A small GPT-J: 2 layers, width 512, vocab 1024.
    # (Two steps and repeats: tiny CPU timings are noisy; the point is that everything runs.)
    shape_env=(OCTET_BENCH_LAYERS=2 OCTET_BENCH_EMBD=512 OCTET_BENCH_VOCAB=1024 OCTET_BENCH_STEPS=2)
    decode_env=(OCTET_BENCH_LAYERS=2 OCTET_BENCH_EMBD=512 OCTET_BENCH_VOCAB=1024 OCTET_BENCH_NEW=16 OCTET_BENCH_REPEATS=2)
else
    device="${GPU_CHECK_DEVICE:-cuda}"
    shapes="${GPU_CHECK_SHAPES:-1x256,4x512,8x2048}"
    shape_env=(OCTET_BENCH_LAYERS=28 OCTET_BENCH_EMBD=4096 OCTET_BENCH_VOCAB=50400 OCTET_BENCH_STEPS=1)
    decode_env=(OCTET_BENCH_LAYERS=28 OCTET_BENCH_EMBD=4096 OCTET_BENCH_VOCAB=50400 OCTET_BENCH_NEW=32 OCTET_BENCH_REPEATS=2)
fi

section() { printf '\n== %s ==\n' "$1"; }
started=$SECONDS
status=0

section "1. octet env"
"$bundle/bin/octet" env || status=1

section "2. CUDA-marked tests (they say why when they skip)"
# Only the cuda_ tests: the others run the octet binary from the build machine's path.
if ! "$bundle/bin/it" gpu::cuda_ --test-threads 1 --nocapture >"$bundle/tests.log" 2>&1; then status=1; fi
grep -E '^(test gpu::|SKIPPED|cuda |test result:)|panicked|assert' "$bundle/tests.log" \
    | sed -E 's/^test gpu::/  /' | head -n 30 || true

section "3-4. training step, (a) 8-bit vs (b) bf16 frozen weights vs transformers + peft; targets in []"
env "${shape_env[@]}" OCTET_BENCH_DEVICE="$device" OCTET_BENCH_SHAPES="$shapes" \
    "$bundle/bin/bench-train" --gpu-check 2>"$bundle/train.log" || status=1
grep -E 'failed' "$bundle/train.log" | cut -c1-200 | head -n 6 || true

section "5. decode tokens/s, 8-bit vs bf16 weights (bf16 compute)"
env "${decode_env[@]}" OCTET_BENCH_DEVICE="$device" OCTET_BENCH_FLOAT=bf16 OCTET_BENCH_BATCHES=1,8 \
    "$bundle/bin/bench-generate" 2>"$bundle/decode.log" | sed '/^$/d' || status=1
grep -E 'failed' "$bundle/decode.log" | cut -c1-200 | head -n 6 || true

section "6. data-parallel set-up: one NCCL rank (init, all-reduce, 5 steps) equals a plain run"
# One GPU cannot host two NCCL ranks (NCCL refuses two ranks on one device), so this checks
# the NCCL path at world size 1; the two-rank semantics are tested over Gloo on the CPU.
dist_backend=nccl
[ "$mode" = dry-run ] && dist_backend=gloo
dd="$bundle/dist-check"
rm -rf "$dd" && mkdir -p "$dd"
printf 'the cat sat on the mat and looked at the hat. %.0s' $(seq 60) >"$dd/data.txt"
dist_args=(train --model "$bundle/fixtures/tiny_gptj/hf_safetensors" --data "$dd/data.txt"
    --steps 5 --seq-len 32 --batch-size 2 --lora-r 4 --lora-dropout 0 --optim adamw
    --device "$device" --seed 3)
if "$bundle/bin/octet" "${dist_args[@]}" --out "$dd/plain" >"$bundle/dist.log" 2>&1 &&
    env WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 \
        MASTER_PORT="${GPU_CHECK_PORT:-29531}" \
        "$bundle/bin/octet" "${dist_args[@]}" --dist-backend "$dist_backend" --out "$dd/rank" \
        >>"$bundle/dist.log" 2>&1; then
    "$PYTHON" - "$dd/plain" "$dd/rank" "$dist_backend" <<'PY' || status=1
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/adapter_model.safetensors") for d in sys.argv[1:3])
diff = max((a[k] - b[k]).abs().max().item() for k in a)
ok = a.keys() == b.keys() and diff == 0.0
print(f"  {sys.argv[3]} world size 1, 5 steps: max |adapter difference| {diff:g} (target 0) {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
else
    status=1
    echo "  failed:"; tail -n 5 "$bundle/dist.log" | cut -c1-200
fi

section "done in $((SECONDS - started)) s (full logs: $bundle/*.log)"
exit $status
