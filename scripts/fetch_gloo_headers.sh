#!/usr/bin/env bash
# Puts gloo's C++ headers (which torch's ProcessGroupGloo.hpp includes but the torch wheel does
# not ship) into DEST/include/gloo, from Debian's libgloo-dev package. Headers only: the gloo
# code itself is inside libtorch. Usage: scripts/fetch_gloo_headers.sh DEST
set -euo pipefail
dest=${1:?usage: $0 DEST}
version="0.0~git20220518.5b14351-3"
url="http://deb.debian.org/debian/pool/main/g/gloo/libgloo-dev_${version/\~/%7E}_amd64.deb"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get knows the mirror configured here; the pool URL serves any other machine.
if ! (command -v apt-get >/dev/null && apt-get download -qq "libgloo-dev=$version" 2>/dev/null); then
    if command -v curl >/dev/null; then
        curl -fsSL -o gloo.deb "$url"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], "gloo.deb")' "$url"
    fi
fi
deb=$(ls ./*.deb)
mkdir x
if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" x
else
    ar x "$deb"
    tar -xf data.tar.* -C x
fi
test -f x/usr/include/gloo/config.h || { echo "no gloo headers in $deb" >&2; exit 1; }
cd - >/dev/null
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/include"
cp -r "$work/x/usr/include/gloo" "$dest.tmp/include/"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "gloo headers in $dest/include"
