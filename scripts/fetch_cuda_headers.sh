#!/usr/bin/env bash
# Puts the CUDA C++ core headers (CCCL: <nv/target>, <cuda/std/...>) that torch's
# ProcessGroupNCCL.hpp reaches through cuda_fp16.h, and that the CUDA torch wheel's nvidia
# packages lack, into DEST/include: the nvidia-cuda-cccl wheel of torch's CUDA version, from
# PyPI. Nothing when torch has no CUDA. Usage: scripts/fetch_cuda_headers.sh PYTHON DEST
set -euo pipefail
py=${1:?usage: $0 PYTHON DEST}
dest=${2:?usage: $0 PYTHON DEST}
cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")')
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/include"
if [ -n "$cuda" ]; then
    major=${cuda%%.*}
    minor=${cuda#*.}; minor=${minor%%.*}
    pkg=nvidia-cuda-cccl
    [ "$major" -lt 13 ] && pkg="nvidia-cuda-cccl-cu$major"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$py" -m pip download -q --no-deps "$pkg~=$major.$minor.0" -d "$work"
    "$py" - "$work"/*.whl "$dest.tmp/include" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for m in z.infolist():
        parts = m.filename.split("/")
        # nvidia/<cuXX or cuda_cccl>/include/<header path>
        if len(parts) > 3 and parts[0] == "nvidia" and parts[2] == "include" and not m.is_dir():
            m.filename = "/".join(parts[3:])
            z.extract(m, out)
PY
    test -f "$dest.tmp/include/nv/target" || { echo "no <nv/target> in $pkg" >&2; exit 1; }
    echo "CUDA $cuda core headers ($pkg) in $dest/include"
else
    echo "torch has no CUDA: no CUDA headers needed"
fi
rm -rf "$dest"
mv "$dest.tmp" "$dest"
