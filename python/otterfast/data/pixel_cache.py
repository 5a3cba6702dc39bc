"""`otterfast data cache-pixels INDEX`: decode every image of an index once, keep its pixels for every epoch after.

Why: after packing and the native decoder, the loader's time is the images themselves: reading, base64, JPEG decode
and the bicubic resize cost ~4.6 ms of a 0.8 MP photo on one core, and Otter pays ~14 ms for the same
(benches/results/loader_profile.md); neither can go much below its decode floor, and both pay it again every epoch.
Otter's and CLIP's transforms have no random part, so the 8-bit square they make before normalisation is the same
every epoch: this writes it once, `3 * size * size` bytes per image (147 KiB at 224 px), and the native loader then
reads that square and normalises it, skipping the tables and the decoder (`otterfast bench loader` reports both).

Exact: the cached square is the very u8 image the loader would make, and it is normalised by the same code, so
batches are bit-identical with and without the cache (tests/test_pixel_cache.py). An image that fails to decode is
not cached and listed beside the cache; the loader decodes it as before, so it raises or is skipped and counted as
before.

On disk: `INDEX/pixels/<transform>-<size>[-draft].u8` (raw slots, one per image row, written through a `.partial`
file, fsynced, then renamed) and `.json` beside it: the transform, the failed rows and a digest of the index's
`meta.json` and images table. The loader (`LoaderConfig.pixel_cache`: "auto" uses a cache that matches the index
and its own image_transform, image_size and jpeg_draft; "never"; "require" refuses to run without one) ignores
with a warning a cache whose digest no longer matches (the index was prepared or repacked again).

Not for Fuyu indexes (OtterHD): their patches keep each image's own size, up to 1080 x 1920 (6 MB a photo).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from collections import Counter

from .. import _native
from .defects import DataError
from .index import PreparedIndex
from .native_index import NativeIndex
from .repack import fsync_dir, fsync_write

CACHE_DIR = "pixels"
FORMAT = 1
# The pixels a cache holds are those of this code's decoders and resize (rust/decode.rs, transform.rs): bump this
# when a change there moves any pixel, so that caches written before are rebuilt instead of served.
PIXELS_VERSION = 1


def cache_name(transform: str, size: int, jpeg_draft: bool) -> str:
    return f"{transform}-{size}" + ("-draft" if jpeg_draft else "")


def index_digest(ix: PreparedIndex) -> str:
    """sha256 of the index's meta.json and images table: what the cache's slots are numbered by."""
    h = hashlib.sha256()
    for name in ("meta.json", ix.meta.get("images_file", "images.arrow")):
        with open(os.path.join(ix.path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build(index: PreparedIndex | str, transform: str = "otter", size: int = 224, jpeg_draft: bool = False,
          threads: int = 0, window_mb: int = 256, if_missing: bool = False) -> dict:
    """Write the cache of `index` for one transform; returns its summary (the `.json` written beside it). One build
    of a folder at a time (a lock in `pixels/`); with `if_missing`, a valid cache found once the lock is held (another
    run built it meanwhile) is kept and its summary returned."""
    ix = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
    if ix.format == "fuyu":
        raise DataError(f"{ix.path}: a Fuyu (OtterHD) index has no fixed-size pixels to cache")
    if transform not in ("otter", "clip"):
        raise ValueError(f"transform must be 'otter' or 'clip', not {transform!r}")
    ix.check_image_files()
    folder = os.path.join(ix.path, CACHE_DIR)
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, cache_name(transform, size, jpeg_draft))
    with open(os.path.join(folder, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if if_missing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if find(ix, transform, size, jpeg_draft) is not None:
                    with open(base + ".json") as f:
                        return json.load(f)
        return _build_locked(ix, base, transform, size, jpeg_draft, threads, window_mb)


def _build_locked(ix, base, transform, size, jpeg_draft, threads, window_mb) -> dict:
    # The old description goes first: a crash mid-build leaves no .json naming a half-written .u8.
    if os.path.exists(base + ".json"):
        os.remove(base + ".json")
    digest = index_digest(ix)  # the index the build reads; checked again after it
    t0 = time.perf_counter()
    try:
        failed = _native.build_pixel_cache(NativeIndex.of(ix), base + ".u8", transform, size, jpeg_draft,
                                           threads, window_mb)
    except ValueError as e:
        raise DataError(str(e)) from None
    if index_digest(ix) != digest:
        raise DataError(f"{ix.path} was rewritten (prepared or repacked) while its pixels were being cached; "
                        "run otterfast data cache-pixels again")
    summary = {
        "format": FORMAT, "pixels_version": PIXELS_VERSION, "transform": transform, "image_size": size,
        "jpeg_draft": jpeg_draft, "images": ix.images.num_rows, "cached": ix.images.num_rows - len(failed),
        "failed": sorted(row for row, _, _ in failed),
        "failed_by_kind": dict(Counter(code for _, code, _ in failed)),
        "failed_examples": [msg for _, _, msg in failed[:5]],
        "bytes": os.path.getsize(base + ".u8"), "seconds": round(time.perf_counter() - t0, 2),
        "index_digest": digest,
    }
    fsync_write(base + ".json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    fsync_dir(os.path.dirname(base))
    return summary


def find(ix: PreparedIndex, transform: str, size: int, jpeg_draft: bool, mode: str = "auto") -> tuple[str, list] | None:
    """The cache of `ix` for this transform: (path of the .u8, failed rows), or None. `mode` "never": None;
    "require": DataError when there is no valid one; "auto": None (with a warning when one is there but stale)."""
    if mode == "never" or ix.format == "fuyu" and mode == "auto":
        return None
    base = os.path.join(ix.path, CACHE_DIR, cache_name(transform, size, jpeg_draft))
    problem = None
    try:
        with open(base + ".json") as f:
            d = json.load(f)
    except FileNotFoundError:
        d, problem = None, f"no pixel cache {base}.json for image_transform {transform!r} at {size} px" + (
            " with jpeg_draft" if jpeg_draft else "") + " (otterfast data cache-pixels)"
    except (OSError, ValueError) as e:
        d, problem = None, f"{base}.json: unreadable ({e})"
    if d is not None:
        want = {"format": FORMAT, "pixels_version": PIXELS_VERSION, "transform": transform, "image_size": size, "jpeg_draft": jpeg_draft,
                "images": ix.images.num_rows}
        wrong = [k for k, v in want.items() if d.get(k) != v]
        if wrong:
            problem = (f"{base}.json: built for another {', '.join(wrong)} (or by another version of otterfast); "
                       "rebuild it (otterfast data cache-pixels)")
        elif d.get("index_digest") != index_digest(ix):
            problem = (f"{base}.json: built for an earlier state of the index (prepared or repacked since); "
                       "rebuild it (otterfast data cache-pixels)")
    if problem is None:
        return base + ".u8", list(d["failed"])
    if mode == "require":
        raise DataError(f"pixel_cache: require, but {problem}")
    if d is not None or os.path.exists(base + ".u8"):
        warnings.warn(f"pixel cache not used: {problem}", stacklevel=3)
    return None
