"""What an index was prepared from, so that a changed input is never silently reused.

meta.json's "inputs" (written by prepare):
    yaml          {path, sha256}         the dataset YAML
    instructions  [{path, sha256}, ...]  every instruction JSON and train-config JSON the YAML names
    tokenizer     [{path, sha256}, ...]  every file of the tokenizer folder prepare was given
    images        [{path, size, mtime_ns}, ...]  every image table file (parquet part files, legacy JSON, tar shards)

The small text inputs are hashed (their content is the index). The image tables are too big to hash at every
start (MIMIC-IT's are tens of GB), and the index points into them by position (file, row group, row, byte
offset): a re-exported table with the same name gives other images at the same positions. Their size and
mtime (nanoseconds) are what any rewrite changes; a copy that keeps both (`cp -p`, `rsync -t`) is accepted.

Two checks use it: `otterfast train` with `data.yaml` recomputes everything (hashes included) and refuses a
reused index whose inputs changed (`changes`); both loaders stat the image files when built and refuse a table
that is not the one indexed (`check_image_files`): a few stat calls, no reading.
"""

from __future__ import annotations

import hashlib
import os

from .defects import DataError

PREPARE_AGAIN = "re-run `otterfast data prepare` (or delete the index folder; `otterfast train` prepares it again)"


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hashed(path: str) -> dict:
    path = os.path.abspath(path)
    try:
        return {"path": path, "sha256": sha256_file(path)}
    except FileNotFoundError:
        return {"path": path, "missing": True}


def stat_entry(path: str) -> dict:
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"path": path, "missing": True}
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _tokenizer_files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files)]
    return out


def of_inputs(yaml_path: str, tokenizer_dir: str) -> dict:
    """The fingerprint of everything `prepare(yaml_path, tokenizer_dir, ...)` reads. A file that is missing is
    recorded as missing (prepare reports it in its own words)."""
    from .mimicit import load_data_yaml_all
    from .sources import open_image_source

    specs, shard_specs = load_data_yaml_all(yaml_path)
    instr = sorted({s.mimicit_path for s in specs} | {s.train_config_path for s in specs if s.train_config_path})
    image_files: list[str] = []
    for path in dict.fromkeys(s.images_path for s in specs if s.images_path):  # YAML order, each table once
        try:
            image_files += open_image_source(path).files
        except DataError:  # unreadable or missing: prepare says so itself
            image_files.append(path)
    image_files += [f for s in shard_specs for f in s.files]  # tar shards: read by byte range, like the tables
    return {
        "yaml": _hashed(yaml_path),
        "instructions": [_hashed(p) for p in instr],
        "tokenizer": [_hashed(p) for p in _tokenizer_files(tokenizer_dir)],
        "images": [stat_entry(p) for p in image_files],
    }


def _describe(old: dict, new: dict) -> str:
    if new.get("missing"):
        return "is gone"
    if old.get("missing"):
        return "was missing, now exists"
    if "sha256" in old:
        return f"content changed (sha256 {old['sha256'][:12]} -> {new['sha256'][:12]})"
    parts = []
    if old["size"] != new["size"]:
        parts.append(f"size {old['size']} -> {new['size']} bytes")
    if old["mtime_ns"] != new["mtime_ns"]:
        parts.append(f"mtime {old['mtime_ns'] / 1e9:.6f} -> {new['mtime_ns'] / 1e9:.6f}")
    return "rewritten (" + ", ".join(parts) + ")"


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two `of_inputs` fingerprints, one phrase per file naming it (empty: the same)."""
    out = []
    if old["yaml"] != new["yaml"]:
        out.append(f"dataset YAML {new['yaml']['path']}: {_describe(old['yaml'], new['yaml'])}")
    for kind, label in (("instructions", "instruction file"), ("tokenizer", "tokenizer file"),
                        ("images", "image table")):
        a = {e["path"]: e for e in old.get(kind, [])}
        b = {e["path"]: e for e in new.get(kind, [])}
        for p in a:
            if p not in b:
                out.append(f"{label} {p}: no longer an input")
            elif a[p] != b[p]:
                out.append(f"{label} {p}: {_describe(a[p], b[p])}")
        out += [f"{label} {p}: a new input" for p in b if p not in a]
    return out


def check_image_files(meta: dict, index_dir: str) -> None:
    """Raise DataError unless every image table file the index points into has the size and mtime it had when the
    index was prepared (stat only). An index without fingerprints (otterfast before index_version 2) is refused:
    its positions cannot be checked."""
    inputs = meta.get("inputs")
    if inputs is None:
        raise DataError(f"{index_dir}: index prepared without input fingerprints (index_version "
                        f"{meta.get('index_version', '?')}, otterfast {meta.get('otterfast_version', '?')}): its "
                        f"image positions cannot be checked against the tables; {PREPARE_AGAIN}")
    # after `data repack` the index points into its own tables (meta "image_files"), not the originals
    for old in meta.get("image_files") or inputs["images"]:
        new = stat_entry(old["path"])
        if new != old:
            raise DataError(f"{old['path']}: image table {_describe(old, new)} since the index {index_dir} was "
                            f"prepared; its image positions (file, row group, row) may now point at other images; "
                            f"{PREPARE_AGAIN}")
