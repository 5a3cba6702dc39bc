"""Where a sample's time goes, per stage, on one core: the native path vs Otter's path.

    .venv/bin/python benches/loader_profile.py [--images 200]

Generates real-photo crops like `bench loader --generate` (long side 256-1600 px, 90% JPEG), then times each
stage over the same images (median of 3 passes). Writes benches/results/loader_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timed(fn, items, passes=3) -> float:
    """Median over passes of the mean ms per item."""
    out = []
    for _ in range(passes):
        t = time.perf_counter()
        for x in items:
            fn(x)
        out.append((time.perf_counter() - t) / len(items) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    a = ap.parse_args()
    import pandas as pd
    from PIL import Image

    from loader import env_info, generate
    from otterfast import _native
    from otterfast.data import images as I
    from otterfast.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, a.images)
        df = pd.read_parquet(os.path.join(tmp, "BENCH.parquet"))
        tok, _ = load_tokenizer(os.path.join(tmp, "tokenizer"), "simple")
        ids = list(df.index)
        b64 = [v.encode() for v in df["base64"]]
        raw = [base64.b64decode(v) for v in b64]
        mp = sum(Image.open(io.BytesIO(r)).size[0] * Image.open(io.BytesIO(r)).size[1] for r in raw) / len(raw) / 1e6
        text = "<image>User:What is the main colour of this picture? GPT:<answer>The main colour is grey.<|endofchunk|>"
        stages = {
            "otter: df.loc[id] lookup": timed(lambda i: df.loc[i]["base64"], ids),
            "otter: base64 (urlsafe_b64decode)": timed(lambda v: base64.urlsafe_b64decode(v), b64),
            "otter: PIL decode + convert RGB": timed(lambda r: Image.open(io.BytesIO(r)).convert("RGB"), raw),
            "otter: resize 224 bicubic + normalise (PIL + numpy)": timed(
                lambda im: I.otter_transform(im), [I.decode_rgb(r) for r in raw]),
            "otter: tokenize one sample": timed(lambda _: tok(text, add_special_tokens=False), range(len(raw))),
            "native: base64 (Rust)": timed(lambda v: _native.decode_base64(v), b64),
            "native: decode, full (zune-jpeg)": timed(lambda r: _native.decode_image(r), raw),
            "native: decode, draft (libjpeg-turbo, DCT-scaled)": timed(lambda r: _native.decode_image(r, 224), raw),
            "native: decode draft + resize + normalise": timed(
                lambda r: _native.transform_image(r, "otter", jpeg_draft=True), raw),
            "native: decode full + resize + normalise": timed(lambda r: _native.transform_image(r, "otter"), raw),
        }
    res = {"images": a.images, "mean_megapixels": round(mp, 3), "ms_per_image_one_core": {k: round(v, 3) for k, v in stages.items()},
           "env": env_info()}
    os.makedirs("benches/results", exist_ok=True)
    with open("benches/results/loader_profile.json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Where the time goes ({res['env']['date']}, one core of {res['env']['cpu']})", "",
             f"{a.images} generated real-photo crops, mean {mp:.2f} MP, 90% JPEG; ms per image, median of 3 passes.", "",
             "| stage | ms per image |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in stages.items()]
    md = "\n".join(lines) + "\n"
    with open("benches/results/loader_profile.md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
