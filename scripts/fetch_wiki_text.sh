#!/usr/bin/env bash
# Fetches a second English text, held out from every fit, into OUT_DIR/wiki.txt: the Wikipedia
# excerpt shipped in the PyPI wheel gensim==4.4.0
# (gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2,
# CC BY-SA), the wiki markup stripped to plain prose by scripts/wiki_plain_text.py.
#
# Usage: fetch_wiki_text.sh PYTHON OUT_DIR
set -euo pipefail
PY=${1:?usage: fetch_wiki_text.sh PYTHON OUT_DIR}
OUT=${2:?usage: fetch_wiki_text.sh PYTHON OUT_DIR}
MEMBER=gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2

mkdir -p "$OUT"
DL=$(mktemp -d "$OUT/.dl.XXXXXX")
trap 'rm -rf "$DL"' EXIT
"$PY" -m pip download -q gensim==4.4.0 --no-deps --only-binary :all: -d "$DL"
"$PY" - "$DL" "$MEMBER" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/gensim-4.4.0-*.whl")[0]
zipfile.ZipFile(wheel).extract(sys.argv[2], sys.argv[1])
PYEOF
"$PY" "$(dirname "$0")/wiki_plain_text.py" "$DL/$MEMBER" "$DL/wiki.txt"
mv "$DL/wiki.txt" "$OUT/wiki.txt"
echo "fetched into $OUT: wiki.txt ($(wc -c < "$OUT/wiki.txt") bytes)"
