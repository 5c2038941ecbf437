"""Writes one malformed torch.save checkpoint for octet's input-safety tests.

usage: make_bad_bin.py KIND SRC OUT
  unsorted-code    SRC = a GPT-J 8-bit pytorch_model.bin; swaps two entries of one code
  negative-absmax  SRC = a GPT-J 8-bit pytorch_model.bin; one block scale made -1
  bomb             SRC ignored; a 4-element tensor whose deflated storage entry inflates to
                   512 MiB of zeros (a few hundred KB on disk)
  lying-size       SRC ignored; a deflated storage entry whose zip headers declare 2 GiB
"""
import io
import struct
import sys
import zipfile

import torch


def rezip(state, out, storage_writer):
    """torch.save(state) re-zipped: every entry copied, the storage entries deflated by
    `storage_writer(zip, info, data)`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if "/data/" in info.filename and not info.filename.endswith(".pkl"):
                storage_writer(dst, info.filename, data)
            else:
                dst.writestr(info, data)


def main():
    kind, src, out = sys.argv[1:4]
    if kind in ("unsorted-code", "negative-absmax"):
        sd = torch.load(src)
        if kind == "unsorted-code":
            c = sd["transformer.h.0.attn.q_proj.code"]
            c[10], c[11] = c[11].item(), c[10].item()
        else:
            sd["transformer.h.1.mlp.fc_out.absmax"][0] = -1.0
        torch.save(sd, out)
    elif kind == "bomb":
        # ZipFile.open(..., "w") takes the compression from the ZipInfo.
        def bomb_entry(z, name, data):
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                chunk = bytes(1 << 20)
                for _ in range(512):
                    f.write(chunk)
        rezip({"w": torch.zeros(4)}, out, bomb_entry)
    elif kind == "lying-size":
        def deflated(z, name, data):
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        rezip({"w": torch.arange(4, dtype=torch.float32)}, out, deflated)
        b = bytearray(open(out, "rb").read())
        # Central directory records: uncompressed size at +24; local headers: at +22.
        for sig, off in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
            i = b.find(sig)
            while i >= 0:
                name_len = struct.unpack_from("<H", b, i + (28 if sig == b"PK\x01\x02" else 26))[0]
                name_at = i + (46 if sig == b"PK\x01\x02" else 30)
                name = bytes(b[name_at:name_at + name_len])
                if b"/data/" in name and not name.endswith(b".pkl"):
                    struct.pack_into("<I", b, i + off, 0x80000000)
                i = b.find(sig, i + 4)
        open(out, "wb").write(bytes(b))
    else:
        sys.exit(f"unknown kind {kind}")


if __name__ == "__main__":
    main()
