"""`otterfast data validate` and `otterfast data prepare`: check everything once, then write an index.

The index is not a copy of the data: per sample it holds the rendered, tokenized text with its label
spans and media positions; per image a reference into its table (file, row group, row; or a byte range
of a legacy JSON) plus the width and height read from the encoded header. Image tables are streamed
one row-group batch at a time, so memory is bounded by the index, never by the images.

Layout decisions (otter-reference 1.7, 1.8, 3.4, 8.2), on purpose:
- IMAGE_TEXT: one media item on the first turn; a record with several images gives one media with those
  images as frames (Otter's layout, which its model expects).
- IMAGE_TEXT_IN_CONTEXT: every turn (context examples first, query last) has its own `<image>` and loads
  its *own* images, one media per `<image>`, as Otter's inference does. Otter's training loads only the
  query's images, so every `<image>` after the first attends to the wrong media.
- VIDEO_TEXT: one media whose frames are the query's frame ids resampled to `video_frames` (linspace).
- max_seq_len counts every token (BOS, EOS and, for fuyu, the image tokens). A sample that does not fit
  drops its context turns, oldest first; if the query alone still does not fit, the sample is dropped.
  Both are counted. Nothing is cut mid-answer (Otter truncates the end, losing the query's answer).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from .. import __version__
from . import fingerprint
from . import images as imgs
from . import prompts
from .defects import DataError, DefectReport
from . import shards
from .mimicit import (
    IMAGE_GROUPS,
    DatasetSpec,
    Record,
    load_data_yaml_all,
    load_train_config,
    merge_group_instructions,
    resample_frames,
)
from .sources import ImageRef, ImageSource, open_image_source, read_json_blobs, scan_ids

INDEX_VERSION = 2  # 2: meta.json records its inputs' fingerprints (fingerprint.py)


@dataclass
class PrepareOptions:
    format: str = "simple"
    max_seq_len: int = 2048
    on_error: str = "raise"
    keep_symbols: bool = True
    populate_rel_ins: bool = False  # without a train config, use each record's rel_ins_ids as its context
    with_task_description: bool = False
    video_frames: int = 32  # Otter's --resample_frames
    max_image_pixels: int = imgs.DEFAULT_MAX_IMAGE_PIXELS
    fuyu_max_height: int = imgs.FUYU_MAX_H
    fuyu_max_width: int = imgs.FUYU_MAX_W

    def __post_init__(self) -> None:
        if self.format not in prompts.FORMATS:
            raise ValueError(f"unknown format {self.format!r}; valid: {', '.join(prompts.FORMATS)}")
        if self.max_seq_len < 8:
            raise ValueError("max_seq_len must be at least 8")


@dataclass
class Candidate:
    """A training sample before tokenization: turns in order (context first, query last)."""

    spec: DatasetSpec
    query: Record
    context: list[Record]
    # per turn of (context + [query]): the image ids of the media on that turn, or None
    media_ids: list[list[str] | None] = field(default_factory=list)
    media_rows: list[list[int] | None] = field(default_factory=list)  # the same, as image-table rows


def media_layout(group: str, records: list[Record], video_frames: int) -> list[list[str] | None]:
    """Which image ids each turn carries, by group (see the module docstring)."""
    if group == "TEXT_ONLY":
        return [None] * len(records)
    if group == "IMAGE_TEXT_IN_CONTEXT":
        return [list(r.image_ids) for r in records]
    ids = records[-1].image_ids
    if group == "VIDEO_TEXT":
        ids = resample_frames(ids, video_frames)
    return [list(ids)] + [None] * (len(records) - 1)


@dataclass
class Validated:
    specs: list[DatasetSpec]
    sources: list[ImageSource]
    image_rows: list[dict]  # one per distinct referenced image: id, source, ref, header fields
    candidates: list[Candidate]
    report: DefectReport
    n_records: int
    shard_specs: list[shards.ShardSpec] = field(default_factory=list)
    shard_scan: shards.ShardScan = field(default_factory=shards.ShardScan)  # samples built only with a tokenizer


class _ImageCatalog:
    """Image ids of the group's tables -> (source index, ref); sources opened and scanned once per path."""

    def __init__(self) -> None:
        self.sources: list[ImageSource] = []
        self.by_path: dict[str, int] = {}
        self.ids_by_source: dict[int, dict[str, ImageRef]] = {}
        self.dupes_by_source: dict[int, set[str]] = {}

    def source(self, path: str, report: DefectReport) -> int:
        if path not in self.by_path:
            src = open_image_source(path)
            si = len(self.sources)
            self.sources.append(src)
            self.by_path[path] = si
            ids: dict[str, ImageRef] = {}
            dupes: set[str] = set()
            try:
                for image_id, ref in scan_ids(src):
                    if image_id in ids:
                        report.add("duplicate_image_id", src.files[ref.file], image_id, "appears twice in this table")
                        dupes.add(image_id)
                    else:
                        ids[image_id] = ref
            except DataError:
                raise
            except (ValueError, OSError, pa.ArrowException) as e:  # a corrupt page of the id column (ArrowInvalid)
                raise DataError(f"{path}: corrupt parquet table: its image ids cannot be read "
                                f"({' '.join(str(e).split())})") from None
            self.ids_by_source[si] = ids
            self.dupes_by_source[si] = dupes
        return self.by_path[path]


def validate(yaml_path: str, opts: PrepareOptions, tok=None, info=None) -> Validated:
    """Run every check; in raise mode, raise one DataError listing all defects found.

    Pretraining shards (MMC4 / LAION groups, data/shards.py) are read once here: without a tokenizer only their
    checks and image filters run; with one (prepare) their samples are built too (`shard_scan`)."""
    report = DefectReport(on_error=opts.on_error)
    specs, shard_specs = load_data_yaml_all(yaml_path)
    if shard_specs and opts.format == "fuyu":
        raise DataError(f"{yaml_path}: pretraining shards (MMC4, LAION) need an Otter format with <image> in the "
                        f"text (simple, llama2, idefics), not fuyu")
    by_group: dict[str, list[DatasetSpec]] = defaultdict(list)
    for s in specs:
        by_group[s.group].append(s)
    catalog = _ImageCatalog()
    candidates: list[Candidate] = []
    images_by_group: dict[str, dict[str, tuple[int, ImageRef]]] = {}
    n_records = 0
    for group, gspecs in by_group.items():
        records, dup_ins = merge_group_instructions(gspecs, report)
        n_records += len(records)
        # Image ids of this group: every distinct table its datasets name.
        group_images: dict[str, tuple[int, ImageRef]] = {}
        bad_images: set[str] = set()
        for s in gspecs:
            if s.images_path is None:
                continue
            si = catalog.source(s.images_path, report)
            bad_images |= catalog.dupes_by_source[si]
            for image_id, ref in catalog.ids_by_source[si].items():
                if image_id in group_images and group_images[image_id][0] != si:
                    other = catalog.sources[group_images[image_id][0]].path
                    report.add("duplicate_image_id", s.images_path, image_id, f"also in {other} (same group)")
                    bad_images.add(image_id)
                else:
                    group_images[image_id] = (si, ref)
        images_by_group[group] = group_images
        for s in gspecs:
            candidates += _dataset_candidates(s, records, dup_ins, group_images, bad_images, opts, report)
    image_rows = _probe_referenced(candidates, images_by_group, catalog, opts, report)
    scan = shards.ShardScan()
    if shard_specs:
        scan = shards.scan(shard_specs, report, opts, tok, info, source_base=len(catalog.sources),
                           row_base=len(image_rows))
        image_rows += scan.image_rows
        n_records += scan.documents
    report.raise_if_needed()
    return Validated(specs, catalog.sources + scan.sources, image_rows, candidates, report, n_records,
                     shard_specs, scan)


def _dataset_candidates(
    s: DatasetSpec,
    records: dict[str, Record],
    dup_ins: set[str],
    group_images: dict[str, tuple[int, ImageRef]],
    bad_images: set[str],
    opts: PrepareOptions,
    report: DefectReport,
) -> list[Candidate]:
    if s.train_config_path:
        config = load_train_config(s.train_config_path)
        keys = list(config)
    else:
        config = None
        keys = [rid for rid, r in records.items() if r.path == s.mimicit_path]
    out: list[Candidate] = []
    for qid in keys:
        q = records.get(qid)
        if q is None:
            report.add("missing_query_id", s.train_config_path, qid, "train-config key not in the instruction files")
            continue
        if qid in dup_ins:
            continue  # already reported
        ok = True
        for fld in ("instruction", "answer"):
            if getattr(q, fld) is None:
                report.add(f"missing_{fld}", q.path, qid)
                ok = False
        if not ok:
            continue
        ctx_ids = config[qid] if config is not None else (q.rel_ins_ids if opts.populate_rel_ins else [])
        context: list[Record] = []
        for cid in ctx_ids:
            c = records.get(cid)
            where = s.train_config_path if config is not None else q.path
            if c is None:
                report.add("missing_rel_ins_id", where, qid, f"context id {cid!r} does not exist")
                continue
            if cid in dup_ins:
                continue
            if c.instruction is None or c.answer is None:
                report.add("missing_instruction" if c.instruction is None else "missing_answer", c.path, cid)
                continue
            context.append(c)
        turns = context + [q]
        layout = media_layout(s.group, turns, opts.video_frames)
        ok = True
        for rec, ids in zip(turns, layout):
            if ids is None:
                continue
            if not ids:
                report.add("no_images", rec.path, rec.id, f"record in {s.group} has no image_ids")
                ok = False
            for image_id in ids:
                if image_id in bad_images:
                    ok = False
                elif image_id not in group_images:
                    report.add("missing_image_id", rec.path, rec.id, f"image id {image_id!r} is in no image table of group {s.group}")
                    ok = False
        if ok:
            out.append(Candidate(s, q, context, layout))
    return out


def _probe_referenced(
    candidates: list[Candidate],
    images_by_group: dict[str, dict[str, tuple[int, ImageRef]]],
    catalog: _ImageCatalog,
    opts: PrepareOptions,
    report: DefectReport,
) -> list[dict]:
    """Read the header of every referenced image (streamed per row group) and fill media_rows."""
    from .. import _native

    wanted: dict[tuple[int, str], int] = {}  # (source, image id) -> row of `rows`
    rows: list[dict] = []

    def locate(group: str, image_id: str) -> int:
        si, ref = images_by_group[group][image_id]  # present: checked by _dataset_candidates
        key = (si, image_id)
        if key not in wanted:
            wanted[key] = len(rows)
            rows.append({"image_id": image_id, "source": si, "ref": ref})
        return wanted[key]

    for c in candidates:
        c.media_rows = [None if ids is None else [locate(c.spec.group, i) for i in ids] for ids in c.media_ids]

    # Stream the referenced rows, one row group at a time, page by page (rust/shard.rs): memory stays at a
    # few images even when the table is one huge row group, as pandas writes Otter's tables.
    by_rg: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for ri, r in enumerate(rows):
        by_rg[(r["source"], r["ref"].file, r["ref"].row_group)].append(ri)
    for (si, fi, rg), ris in sorted(by_rg.items()):
        src = catalog.sources[si]
        is_b64 = src.encoding == "base64"
        if src.kind == "json":
            arr = pa.array(read_json_blobs(src, [rows[ri]["ref"] for ri in ris]), type=pa.binary())
            _apply_probe(rows, ris, probe_arrow(arr, is_b64), src, opts, report)
            continue
        ris.sort(key=lambda i: rows[i]["ref"].row)
        try:
            probed = _native.probe_parquet_rows(src.files[fi], src.image_column, rg,
                                                [rows[i]["ref"].row for i in ris], is_b64)
        except (ValueError, OSError) as e:  # a corrupt page: every image wanted from this row group is a defect
            msg = " ".join(str(e).removeprefix(f"{src.files[fi]}: ").split())
            msg = msg if msg.startswith("row group") else f"row group {rg}: {msg}"
            probed = [("unreadable_table", 0, 0, "", 0, f"cannot be read: {msg}")] * len(ris)
        _apply_probe(rows, ris, probed, src, opts, report)
    bad = {i for i, r in enumerate(rows) if r.get("defect")}
    if bad:
        kept = [c for c in candidates if not any(m and any(i in bad for i in m) for m in c.media_rows)]
        candidates[:] = kept
    return rows


def probe_arrow(arr: pa.Array, is_b64: bool) -> list[tuple]:
    """Probe every value of an Arrow binary/string array through its buffers (no Python object per image)."""
    from .. import _native

    nulls = arr.is_null().to_pylist() if arr.null_count else [False] * len(arr)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    large = pa.types.is_large_binary(arr.type)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64 if large else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = bufs[2] if bufs[2] is not None else pa.py_buffer(b"")
    probed = _native.probe_images(memoryview(data).cast("B"), np.ascontiguousarray(offsets, dtype=np.int64), is_b64)
    return [("null_image", 0, 0, "", 0, "image bytes are null") if isnull else p for isnull, p in zip(nulls, probed)]


def _size_defect(w: int, h: int, opts: PrepareOptions) -> tuple[str, str] | None:
    d = imgs.size_defect(w, h, opts.max_image_pixels)
    if d is None and opts.format == "fuyu":
        try:
            imgs.fuyu_checked_size(h, w, opts.fuyu_max_height, opts.fuyu_max_width)
        except imgs.ImageSizeError as e:
            d = (e.kind, e.message)
    return d


def _apply_probe(rows, ris, probed, src: ImageSource, opts, report) -> None:
    for ri, (code, w, h, fmt, n, msg) in zip(ris, probed):
        r = rows[ri]
        path = src.files[r["ref"].file]
        if code:
            report.add(code, path, r["image_id"], msg)
            r["defect"] = code
        elif (d := _size_defect(w, h, opts)) is not None:  # the loaders' rule (images.size_defect), before decoding
            report.add(d[0], path, r["image_id"], d[1])
            r["defect"] = d[0]
        else:
            r.update(width=int(w), height=int(h), format=fmt, encoded_len=int(n))


# ---- prepare -----------------------------------------------------------------------------------------

def _task_description(c: Candidate, opts: PrepareOptions) -> str | None:
    if not (opts.with_task_description and c.spec.task_descriptions):
        return None
    rng = random.Random(zlib.crc32(f"{c.spec.name}/{c.query.id}".encode()))
    return rng.choice(c.spec.task_descriptions)


def _turns(fmt_extra, records: list[Record], layout, opts: PrepareOptions) -> list[prompts.Turn]:
    return [
        prompts.Turn(
            prompts.clean_instruction(r.instruction, opts.keep_symbols, fmt_extra),
            prompts.clean_answer(r.answer, opts.keep_symbols, fmt_extra),
            m is not None,
        )
        for r, m in zip(records, layout)
    ]


def build_sample(c: Candidate, tok, info, image_rows: list[dict], opts: PrepareOptions, report: DefectReport):
    """Render + tokenize one candidate, dropping context turns (oldest first) until it fits. None if it can't."""
    from .tokenizer import tokenize_rendered

    extra = tuple(t for t in (tok.bos_token, tok.eos_token, tok.pad_token) if t)
    records = c.context + [c.query]
    desc = _task_description(c, opts)
    for drop in range(len(c.context) + 1):
        recs = records[drop:]
        if drop and c.spec.group != "IMAGE_TEXT_IN_CONTEXT":
            # the conversation's media moves to the new first turn
            layout_rows = [c.media_rows[0]] + [None] * (len(recs) - 1)
        else:
            layout_rows = c.media_rows[drop:]
        rendered = prompts.render(opts.format, _turns(extra, recs, layout_rows, opts), desc)
        t = tokenize_rendered(tok, info, rendered)
        media = [m for m in layout_rows if m is not None]
        n_img_tokens = 0
        if opts.format == "fuyu":
            for m in media:
                for ri in m:
                    n_img_tokens += imgs.fuyu_num_tokens(
                        image_rows[ri]["height"], image_rows[ri]["width"], opts.fuyu_max_height, opts.fuyu_max_width
                    )
        total = len(t.input_ids) + n_img_tokens
        if total <= opts.max_seq_len:
            if drop:
                report.count_truncation("context_dropped", drop)
            return {
                "sample_id": c.query.id,
                "dataset": c.spec.name,
                "group": c.spec.group,
                "source_ids": [r.id for r in recs],
                "text": rendered.text,
                "input_ids": t.input_ids,
                "label_spans": [x for span in t.label_spans for x in span],
                "media_pos": t.media_pos,
                "media_images": media,
                "num_text_tokens": len(t.input_ids),
                "num_image_tokens": n_img_tokens,
                "num_tokens": total,
                "context_dropped": drop,
            }
    report.count_truncation("sample_too_long")
    return None


SAMPLES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("dataset", pa.string()),
    ("group", pa.string()),
    ("source_ids", pa.list_(pa.string())),
    ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("label_spans", pa.list_(pa.int32())),  # flattened [start0, end0, start1, end1, ...]
    ("media_pos", pa.list_(pa.int32())),
    ("media_images", pa.list_(pa.list_(pa.int32()))),  # rows of images.arrow, per media (frames inside)
    ("num_text_tokens", pa.int32()),
    ("num_image_tokens", pa.int32()),
    ("num_tokens", pa.int32()),
    ("context_dropped", pa.int16()),
])

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("source", pa.int32()),
    ("file", pa.int32()),
    ("row_group", pa.int32()),
    ("row", pa.int32()),
    ("byte_offset", pa.int64()),
    ("byte_length", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("encoded_len", pa.int64()),
])


def _write_arrow(path: str, table: pa.Table) -> None:
    # Arrow IPC, uncompressed: memory-mappable and readable by the native loader without a copy.
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=65536)


def prepare(yaml_path: str, tokenizer_dir: str, out_dir: str, opts: PrepareOptions) -> dict:
    """Validate, render and tokenize every sample once, and write the index to `out_dir`."""
    from .tokenizer import load_tokenizer

    t0 = time.perf_counter()
    # Fingerprinted before anything is read and again after: an input rewritten while it was being read is an error
    # (the index would mix the two versions), and the index records what it was made from.
    inputs = fingerprint.of_inputs(yaml_path, tokenizer_dir)
    tok, info = load_tokenizer(tokenizer_dir, opts.format)
    if opts.format == "fuyu" and (info.fuyu_placeholder_id is None or info.fuyu_newline_id is None):
        raise DataError(f"{tokenizer_dir}: fuyu format needs {prompts.FUYU_PLACEHOLDER} and {prompts.FUYU_NEWLINE}")
    v = validate(yaml_path, opts, tok, info)
    samples = []
    for c in v.candidates:
        s = build_sample(c, tok, info, v.image_rows, opts, v.report)
        if s is not None:
            samples.append(s)
    samples += v.shard_scan.samples
    # Keep only images that surviving samples use, renumbered.
    used = sorted({ri for s in samples for m in s["media_images"] for ri in m})
    remap = {old: new for new, old in enumerate(used)}
    for s in samples:
        s["media_images"] = [[remap[ri] for ri in m] for m in s["media_images"]]
    img_cols = {k: [] for k in IMAGES_SCHEMA.names}
    for ri in used:
        r = v.image_rows[ri]
        ref: ImageRef = r["ref"]
        vals = dict(image_id=r["image_id"], source=r["source"], file=ref.file, row_group=ref.row_group, row=ref.row,
                    byte_offset=ref.byte_offset, byte_length=ref.byte_length, width=r["width"], height=r["height"],
                    format=r["format"], encoded_len=r["encoded_len"])
        for k in img_cols:
            img_cols[k].append(vals[k])

    changed = fingerprint.changes(inputs, fingerprint.of_inputs(yaml_path, tokenizer_dir))
    if changed:
        raise DataError(f"{yaml_path}: inputs changed while being prepared ({'; '.join(changed)}); prepare again")

    os.makedirs(out_dir, exist_ok=True)
    # An index being rewritten in place is not an index until its new meta.json is in place (written last,
    # atomically): a prepare killed half-way must not leave the old meta.json describing the new tables.
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    _write_arrow(os.path.join(out_dir, "samples.arrow"),
                 pa.Table.from_pylist(samples, schema=SAMPLES_SCHEMA) if samples else SAMPLES_SCHEMA.empty_table())
    _write_arrow(os.path.join(out_dir, "images.arrow"), pa.Table.from_pydict(img_cols, schema=IMAGES_SCHEMA))
    tok_dir = os.path.join(out_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        shutil.rmtree(tok_dir)
    tok.save_pretrained(tok_dir)
    n_tokens = sum(s["num_tokens"] for s in samples)
    n_labels = sum(b - a for s in samples for a, b in zip(s["label_spans"][::2], s["label_spans"][1::2]))
    per_dataset = defaultdict(int)
    for s in samples:
        per_dataset[(s["group"], s["dataset"])] += 1
    meta = {
        "otterfast_version": __version__,
        "index_version": INDEX_VERSION,
        "data_yaml": os.path.abspath(yaml_path),
        "options": asdict(opts),
        "inputs": inputs,
        "tokenizer": info.to_dict(),
        "sources": [s.to_dict() for s in v.sources],
        "datasets": [
            {"name": s.name, "group": s.group, "num_samples": s.num_samples,
             "prepared_samples": per_dataset[(s.group, s.name)]}
            for s in v.specs
        ] + [
            # per epoch: weight x (num_samples, or every prepared sample), drawn afresh by the index each epoch
            {"name": s.name, "group": s.group, "num_samples": s.epoch_samples(per_dataset[(s.group, s.name)]),
             "yaml_num_samples": s.num_samples, "weight": s.weight, "loss_weight": s.loss_weight, "shards": s.files,
             "prepared_samples": per_dataset[(s.group, s.name)]}
            for s in v.shard_specs
        ],
        "counts": {
            "records": v.n_records,
            "samples": len(samples),
            "images": len(used),
            "tokens": n_tokens,
            "label_tokens": n_labels,
        },
        "report": {**v.report.as_dict(), "filtered": dict(sorted(v.shard_scan.filtered.items()))},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return meta
