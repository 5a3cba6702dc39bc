"""`otterfast data repack INDEX`: rewrite an index's parquet image tables for random access, once.

Why: Otter's image tables are written by pandas' `to_parquet` defaults: one row group per file, and pyarrow checks
the page size only every 1,024 rows, so one page holds ~1,000 images (the first ones in a dictionary page).
A parquet page is the smallest thing a reader can decompress, so every window of a shuffled epoch decompresses
most of the table again (measured at 2,000 photos, 327 MB: `otterfast bench loader` halves the native loader's
samples/s against the same images in small row groups, and its first batch waits for the whole dictionary page).

What it writes: per parquet source, `INDEX/images/source_<i>.parquet` holding only the images the index
references, in the source's own row order (the images of one sample, e.g. video frames, stay adjacent; an
epoch's order is a fresh shuffle, so there is no better fixed order), as raw encoded bytes (base64 decoded
once: 25% smaller and no base64 pass per load), in row groups of `row_group_rows` rows, uncompressed (JPEG/PNG/
WebP bytes do not compress), no dictionary, pages of a few images. Then a new images table,
`images-repacked.arrow` (file, row group, row, encoded length updated), and `meta.json` naming it (`images_file`),
with the new sources and `image_files` (the size and mtime of the files the index now points into, checked by
the loaders). Every file is fsynced before meta.json is renamed into place, which is the one commit point: a
crash before it leaves the index as it was.

The index's `inputs` (the original tables' fingerprints) are kept: a training run that re-prepares when an
original changes still does, and a re-prepare simply writes the unpacked index again. Legacy JSON image
sources are left as they are (they are already read by byte range).

Memory: the originals are streamed one record batch at a time, so the peak is about one page of the original
(what any reader of that table pays) plus `row_group_rows` images.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import images as imgs
from .defects import DataError
from .fingerprint import stat_entry
from .index import PreparedIndex
from .sources import ImageSource, open_parquet

REPACK_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary())])


def fsync_write(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stored_to_raw(value, encoding: str) -> bytes | None:
    if value is None:
        return None
    if encoding == "raw":
        return value
    try:
        return imgs.b64decode(value)
    except ValueError:
        # Not base64 (prepare counted it as a defect and no sample uses it, or kept it with on_error raise
        # never reached here): keep the bytes; the loaders then report it as not an image, by id.
        return value.encode("ascii", "replace") if isinstance(value, str) else value


def repack_source(src: ImageSource, wanted: dict[tuple[int, int, int], list[int]], out_path: str,
                  row_group_rows: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Stream `src`'s image tables, write the images at the positions in `wanted` ((file, row group, row) ->
    image rows of the index) to `out_path`. Returns (image row, new row group, new row, encoded length) per
    image row, and the number of images written."""
    placed: list[tuple[int, int, int, int]] = []
    pending_ids: list[str] = []
    pending_blobs: list[bytes | None] = []
    n = 0
    files = sorted({f for f, _, _ in wanted})
    tmp = out_path + ".tmp"
    writer = pq.ParquetWriter(tmp, REPACK_SCHEMA, compression="none", use_dictionary=False,
                              write_batch_size=4, data_page_size=1 << 20)

    def flush() -> None:
        if pending_ids:
            writer.write_table(pa.table({"id": pending_ids, "image": pending_blobs}, schema=REPACK_SCHEMA),
                               row_group_size=row_group_rows)
            pending_ids.clear()
            pending_blobs.clear()

    try:
        for f in files:
            path = src.files[f]
            # buffered, not pre-buffered: pyarrow then reads the column chunk page by page instead of whole
            pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
            cols = [src.image_column] + ([src.id_column] if src.id_column else [])
            for rg in range(pf.metadata.num_row_groups):
                if not any((f, rg) == (a, b) for a, b, _ in wanted if a == f and b == rg):
                    continue
                row = 0
                for batch in pf.iter_batches(batch_size=64, row_groups=[rg], columns=cols, use_threads=False):
                    values = batch.column(0)
                    ids = batch.column(1).to_pylist() if src.id_column else None
                    for k in range(batch.num_rows):
                        rows_here = wanted.get((f, rg, row + k))
                        if rows_here is None:
                            continue
                        blob = _stored_to_raw(values[k].as_py(), src.encoding)
                        pending_ids.append(str(ids[k]) if ids is not None else str(rows_here[0]))
                        pending_blobs.append(blob)
                        for r in rows_here:
                            placed.append((r, n // row_group_rows, n % row_group_rows,
                                           len(blob) if blob is not None else 0))
                        n += 1
                        if len(pending_ids) == row_group_rows:
                            flush()
                    row += batch.num_rows
        flush()
        writer.close()
    except (OSError, pa.ArrowException) as e:
        writer.close()
        os.unlink(tmp)
        raise DataError(f"{path}: cannot read image table while repacking: {e}") from None
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out_path)
    return placed, n


# A row group whose image column is larger than this is read whole for any one image (pandas' defaults make a
# table one row group): 64 MiB is ~200 photos, already 3x the repacked groups of 64.
BIG_ROW_GROUP_BYTES = 64 << 20


def needs_repack(index_dir: str) -> list[str]:
    """The parquet image tables of a prepared index that have a row group over BIG_ROW_GROUP_BYTES (their image
    column, compressed), as 'path (N MiB row group)'; [] when repacked already or none (metadata only)."""
    idx = PreparedIndex(index_dir)
    if "repacked" in idx.meta:
        return []
    out = []
    for src in idx.sources:
        if src.kind != "parquet":
            continue
        for path in src.files:
            md = open_parquet(path).metadata
            col = md.schema.names.index(src.image_column) if src.image_column in md.schema.names else None
            if col is None:
                continue
            big = max((md.row_group(g).column(col).total_compressed_size for g in range(md.num_row_groups)),
                      default=0)
            if big > BIG_ROW_GROUP_BYTES:
                out.append(f"{path} ({big / 2**20:.0f} MiB row group)")
    return out


def repack(index_dir: str, row_group_rows: int = 64, log=print) -> dict:
    """Rewrite `index_dir`'s parquet image sources (see the module doc). Returns a summary."""
    if row_group_rows < 1:
        raise ValueError("row_group_rows must be >= 1")
    t0 = time.perf_counter()
    idx = PreparedIndex(index_dir)
    idx.check_image_files()  # the positions must still point at the images they were read from
    images = idx.images
    source = images.column("source").to_numpy()
    file = images.column("file").to_numpy()
    rg = images.column("row_group").to_numpy()
    row = images.column("row").to_numpy()
    new_file = file.copy()
    new_rg = rg.copy()
    new_row = row.copy()
    new_len = images.column("encoded_len").to_numpy().copy()
    out_dir = os.path.join(index_dir, "images")
    os.makedirs(out_dir, exist_ok=True)
    sources = [ImageSource.from_dict(s.to_dict()) for s in idx.sources]
    summary = {"sources": [], "images": 0}
    for i, src in enumerate(idx.sources):
        if src.kind != "parquet":
            continue
        mine = np.flatnonzero(source == i)
        if len(mine) == 0:
            continue
        wanted: dict[tuple[int, int, int], list[int]] = {}
        for r in mine.tolist():
            wanted.setdefault((int(file[r]), int(rg[r]), int(row[r])), []).append(r)
        out_path = os.path.abspath(os.path.join(out_dir, f"source_{i}.parquet"))
        if out_path in src.files:
            raise DataError(f"{index_dir}: source {i} is already repacked ({out_path})")
        t = time.perf_counter()
        placed, n = repack_source(src, wanted, out_path, row_group_rows)
        missing = set(mine.tolist()) - {p[0] for p in placed}
        if missing:
            raise DataError(f"{src.path}: {len(missing)} indexed images not found at their positions while "
                            f"repacking (e.g. image row {min(missing)}); the table changed: prepare again")
        for r, g, w, ln in placed:
            new_file[r], new_rg[r], new_row[r], new_len[r] = 0, g, w, ln
        sources[i] = ImageSource(path=src.path, kind="parquet", files=[out_path], encoding="raw",
                                 id_column="id", image_column="image")
        mb = os.path.getsize(out_path) / 2**20
        log(f"repacked {src.path}: {n} images -> {out_path} ({mb:.0f} MiB, {time.perf_counter() - t:.1f}s)")
        summary["sources"].append({"source": i, "from": src.files, "to": out_path, "images": n, "mib": round(mb, 1)})
        summary["images"] += n
    if not summary["sources"]:
        log(f"{index_dir}: no parquet image tables to repack")
        return summary
    cols = {name: images.column(name) for name in images.column_names}
    cols.update(file=pa.array(new_file, pa.int32()), row_group=pa.array(new_rg, pa.int32()),
                row=pa.array(new_row, pa.int32()), encoded_len=pa.array(new_len, pa.int64()))
    table = pa.Table.from_pydict(cols, schema=images.schema)

    def write_arrow(f) -> None:
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)

    meta_path = os.path.join(index_dir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["repacked"] = {"row_group_rows": row_group_rows, "sources": summary["sources"],
                        "original_sources": meta["sources"]}
    meta["sources"] = [s.to_dict() for s in sources]
    files = [p for s in sources for p in s.files]
    meta["image_files"] = [stat_entry(p) for p in files]
    meta["images_file"] = "images-repacked.arrow"
    fsync_write(os.path.join(index_dir, meta["images_file"]), write_arrow)
    fsync_dir(out_dir)
    fsync_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    fsync_dir(index_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
