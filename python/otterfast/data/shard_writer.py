"""Writing webdataset tar shards in Otter's pretraining layouts (for the demo, the tests and the loader benchmark).

    write_tar(path, [("k0.txt", b"a caption"), ("k0.jpg", jpeg_bytes), ...])
    mmc4_member("k0", sentences, [(image_bytes, sentence_index, matched_sim), ...]) -> ("k0.json", bytes)

Members are written in the order given (webdataset needs a sample's members adjacent), with a fixed mtime so that
the same input gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            tf.addfile(ti, io.BytesIO(data))
    os.replace(tmp, path)
    return path


def mmc4_member(key: str, sentences: list[str], images: list[tuple[bytes, int, float]],
                **extra) -> tuple[str, bytes]:
    """An MMC4 document: `{"text_list": [...], "image_info": [{"image_base64", "matched_text_index",
    "matched_sim", "image_name"}, ...]}` (extra top-level keys as given)."""
    doc = {
        "text_list": list(sentences),
        "image_info": [
            {"image_name": f"{key}_{i}.jpg", "image_base64": base64.b64encode(raw).decode("ascii"),
             "matched_text_index": int(ix), "matched_sim": float(sim)}
            for i, (raw, ix, sim) in enumerate(images)
        ],
        **extra,
    }
    return f"{key}.json", json.dumps(doc).encode("utf-8")


def pair_members(key: str, caption: str, image: bytes, ext: str = "jpg", as_base64: bool = False) -> list:
    """A LAION-style pair: `KEY.txt` and `KEY.<ext>` (raw bytes, or base64 text as Otter's converted shards)."""
    return [(f"{key}.txt", caption.encode("utf-8")),
            (f"{key}.{ext}", base64.b64encode(image) if as_base64 else image)]
