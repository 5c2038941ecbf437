#!/usr/bin/env bash
# Fetches llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and the
# gguf-py it imports) through pip: the PyPI sdist of llama-cpp-python==0.3.36 vendors llama.cpp.
# Checked against a pinned SHA-256 sum; only the build's metadata step runs, nothing is compiled.
#
# Usage: fetch_llama_cpp_converter.sh PYTHON OUT_DIR
set -euo pipefail
PY=${1:?usage: fetch_llama_cpp_converter.sh PYTHON OUT_DIR}
OUT=${2:?usage: fetch_llama_cpp_converter.sh PYTHON OUT_DIR}
VERSION=0.3.36
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

mkdir -p "$OUT"
DL=$(mktemp -d "$OUT/.dl.XXXXXX")
trap 'rm -rf "$DL"' EXIT

"$PY" -m pip download -q llama-cpp-python==$VERSION --no-deps --no-binary llama-cpp-python -d "$DL"
echo "$SHA  $DL/llama_cpp_python-$VERSION.tar.gz" | sha256sum -c --quiet
SRC=llama_cpp_python-$VERSION/vendor/llama.cpp
tar -xzf "$DL"/llama_cpp_python-$VERSION.tar.gz -C "$DL" "$SRC"/convert_hf_to_gguf.py "$SRC"/conversion "$SRC"/gguf-py "$SRC"/LICENSE
rm -rf "$OUT"/convert_hf_to_gguf.py "$OUT"/conversion "$OUT"/gguf-py
mv "$DL/$SRC"/convert_hf_to_gguf.py "$DL/$SRC"/conversion "$DL/$SRC"/gguf-py "$DL/$SRC"/LICENSE "$OUT"/
echo "fetched llama.cpp's converter (llama-cpp-python $VERSION) into $OUT"
