"""How far JPEG draft decoding (DCT-domain downscaling) moves the pixels a model sees, against how far the resize
itself moves them.

    .venv/bin/python benches/draft_drift.py [--index runs/demo/index-simple]

Over every colour/greyscale JPEG of a prepared index (default: the demo's, real photos), after each 224 px
transform (Otter's square bicubic resize, and CLIP's short side + centre crop), on the 0-255 scale before
normalisation:
- draft vs full: the image decoded at reduced DCT scale (PIL `draft`, which the native loader matches exactly:
  tests/test_native.py) against the full decode, both then resized by PIL bicubic (Otter's path);
- resize vs resize: the full decode resized by PIL bicubic (Otter, CLIPImageProcessor) against torch's bicubic
  with antialias (`torchvision.transforms.v2` on tensors, which other trainers use): what two accepted
  implementations of the same resize disagree by, on the same decoded pixels.
Reports PSNR (dB, over all pixels) and the max and mean abs error per image (median and worst over images).
Writes benches/results/draft_drift.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import env_info, write_report  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def torch_resize(img, w: int, h: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp(0, 255).round().numpy()


def pil_resize(img, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32)


def geometry(transform: str, w: int, h: int, size: int = 224):
    """(resize w, resize h, crop box or None) of a transform, as data/images.py."""
    if transform == "otter":
        return size, size, None
    short, long = (w, h) if w <= h else (h, w)
    nl = int(size * long / short)
    nw, nh = (size, nl) if w <= h else (nl, size)
    top, left = (nh - size) // 2, (nw - size) // 2
    return nw, nh, (left, top)


def crop(x: np.ndarray, box, size: int = 224) -> np.ndarray:
    if box is None:
        return x
    left, top = box
    return x[top : top + size, left : left + size]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benches/draft_drift.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", default="runs/demo/index-simple")
    ap.add_argument("--json", default="benches/results/draft_drift.json")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    a = ap.parse_args(argv)
    from PIL import Image

    from otterfast.data import images as imgs
    from otterfast.data.index import PreparedIndex
    from otterfast.data.sources import BlobReader

    idx = PreparedIndex(a.index)
    reader = BlobReader(idx.sources)
    fmt = idx.images.column("format").to_pylist()
    rows = [r for r, f in enumerate(fmt) if f == "jpeg"]
    if a.limit:
        rows = rows[: a.limit]
    per = {t: {"draft_vs_full": [], "draft_vs_full_drafted_only": [], "resize_vs_resize": []}
           for t in ("otter", "clip")}
    scales = []
    for r in rows:
        src, ref = idx.image_ref(r)
        blob = reader.read(src, ref)
        data = imgs.b64decode(blob) if idx.sources[src].encoding == "base64" else blob
        full = imgs.decode_rgb(data)
        draft = imgs.decode_rgb(data, 224)
        scale = round(full.size[0] / draft.size[0])
        scales.append(scale)
        for t in ("otter", "clip"):
            w, h = full.size
            nw, nh, box = geometry(t, w, h)
            ref_px = crop(pil_resize(full, nw, nh), box)
            per[t]["draft_vs_full"].append(crop(pil_resize(draft, nw, nh), box) - ref_px)
            if scale > 1:
                per[t]["draft_vs_full_drafted_only"].append(per[t]["draft_vs_full"][-1])
            per[t]["resize_vs_resize"].append(crop(torch_resize(full, nw, nh), box) - ref_px)
        del full, draft
    out = {"index": a.index, "jpeg_images": len(rows),
           "draft_scale_counts": {str(s): scales.count(s) for s in sorted(set(scales))},
           "env": env_info("PIL", "torch"), "transforms": {}}
    for t, kinds in per.items():
        out["transforms"][t] = {}
        for kind, diffs in kinds.items():
            if not diffs:
                continue
            mse = float(np.mean([np.mean(d.astype(np.float64) ** 2) for d in diffs]))
            maxes = [float(np.abs(d).max()) for d in diffs]
            means = [float(np.abs(d).mean()) for d in diffs]
            out["transforms"][t][kind] = {
                "psnr_db": round(10 * np.log10(255.0**2 / mse), 2) if mse else None,
                "max_abs_median": round(statistics.median(maxes), 1), "max_abs_worst": round(max(maxes), 1),
                "mean_abs_median": round(statistics.median(means), 3), "mean_abs_worst": round(max(means), 3)}
    e = out["env"]
    lines = [f"# JPEG draft decoding: pixel drift ({e['date']}; {a.index}, {len(rows)} JPEGs; DCT scales used: "
             f"{out['draft_scale_counts']})", "",
             "0-255 scale, after the 224 px transform, before normalisation. draft vs full: PIL draft decode (= the "
             "native loader's) against the full decode, both resized by PIL bicubic. resize vs resize: the full "
             "decode, PIL bicubic against torch bicubic with antialias (two accepted implementations of the same "
             "resize). drafted only: the images that draft decoded at a reduced scale (it leaves the others "
             "unchanged). PSNR over all pixels of all images; max/mean abs per image, median and worst.", "",
             "| transform | comparison | PSNR dB | max abs (median / worst) | mean abs (median / worst) |",
             "|---|---|---|---|---|"]
    for t, kinds in out["transforms"].items():
        for kind, v in kinds.items():
            lines.append(f"| {t} | {kind.replace('_', ' ')} | {v['psnr_db']} | {v['max_abs_median']} / "
                         f"{v['max_abs_worst']} | {v['mean_abs_median']} / {v['mean_abs_worst']} |")
    md = "\n".join(lines) + "\n"
    path = write_report(a.json, out, md)
    print(md)
    print(f"wrote {a.json} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
