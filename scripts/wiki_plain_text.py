"""Plain English prose from a bz2 MediaWiki XML dump: the article texts with templates,
tables, references, files and markup removed, paragraphs of prose kept (deterministic).

Usage: wiki_plain_text.py DUMP.xml.bz2 OUT.txt
"""
import bz2
import re
import sys
import xml.etree.ElementTree as ET

MAX_BYTES = 40_000


def strip_nested(text, open_, close):
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def plain(wikitext):
    t = strip_nested(wikitext, "{{", "}}")
    t = strip_nested(t, "{|", "|}")
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"\[\[(?:File|Image|Category):[^\]]*(?:\[\[[^\]]*\]\][^\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", t)
    t = re.sub(r"'{2,}", "", t)
    t = t.replace("&nbsp;", " ")
    paras = []
    for line in t.split("\n"):
        line = line.strip()
        # prose only: no headings, lists, leftovers of tables or templates; whole sentences
        if len(line) < 200 or line[0] in "=*#:;|!{}" or not line.endswith("."):
            continue
        paras.append(re.sub(r"\s+", " ", line))
    return paras


def main(src, out):
    root = ET.fromstring(bz2.open(src).read())
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    paras = []
    for page in root.iter(f"{ns}page"):
        text = page.find(f"{ns}revision/{ns}text")
        if text is not None and text.text:
            paras.extend(plain(text.text))
        if sum(len(p) + 2 for p in paras) >= MAX_BYTES:
            break
    body = "\n\n".join(paras)[:MAX_BYTES]
    with open(out, "w", encoding="utf-8") as f:
        f.write(body[: body.rfind(".") + 1] + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
