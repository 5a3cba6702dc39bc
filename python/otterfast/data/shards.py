"""Webdataset tar shards (Otter's pretraining data): MMC4-style interleaved documents and LAION-style pairs.

Declared in the dataset YAML next to the MIMIC-IT groups (docs/data.md, "Pretraining shards"):

    MMC4:
      my_docs: {shards: "docs/{00000..00003}.tar", sim_threshold: 0.32, weight: 1.0}
    LAION:
      my_pairs: {shards: "pairs/{00000..00001}.tar", weight: 0.5, loss_weight: 0.2}

`weight` is a sampling rate (samples per epoch = weight x (num_samples or every prepared sample)); `loss_weight`
(default Otter's multipliers: MMC4 1.0, LAION 0.2) multiplies each of the dataset's tokens' loss in training
(`token_loss_weights`, models/build.py batch_loss).

`data prepare` reads each shard once, as a stream (`tarfile` in stream mode: one member in memory at a time),
groups members by key as webdataset does (consecutive members whose names share the part before the first dot
of the basename), applies Otter's filters and label rule (../shared/pretraining-reference.md) and writes
ordinary index samples. Images are not copied: an image row points at a byte range of the tar (image source
kind "tar"): a whole `.jpg`/`.png` member (raw bytes, or base64 text when the member holds it: one source per
encoding), or the base64 string inside an MMC4 document's JSON member, located exactly in the member's bytes
and checked equal to the parsed value. Both loaders `pread` those ranges (rust/blobs.rs, sources.BlobReader).

Kept from Otter: the 10 KB and `matched_sim` filters, at most 5 images, the `<|endofchunk|><image>` text, the
whitespace clean-up, truncation to 256 (MMC4) / 32 (LAION) tokens with the tokenizer's own special tokens, the
drop of documents with no `<image>` left and of single-image documents with probability 0.5, the labels.
Changed on purpose:
- the single-image drop is seeded: a hash of (dataset, sample id), so a prepare is reproducible and
  independent of shard order (Otter draws `random.random()` unseeded at every load). It is decided once, at
  prepare: a dropped document is out of every epoch (Otter's would come back in about half of them);
- each image is paired with its own `<image>`: media are ordered by their sentence (Otter keeps image_info's
  order while the `<image>` tokens follow sentence order, so unsorted image_info pairs images with the wrong
  sentence);
- only images whose `<image>` survives truncation are loaded; no zero images are padded in;
- special-token strings inside sentences and captions are removed (as for MIMIC-IT text);
- a caption that is empty after stripping counts as no caption;
- nothing is padded: samples are packed like MIMIC-IT's;
- a shard or member that cannot be read is a defect (`bad_shard`, `bad_member`) naming the shard and the
  member; the filters' drops are counted (`filtered` in meta.json's report), never silent.
"""

from __future__ import annotations

import binascii
import json
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import images as imgs
from . import prompts
from .defects import DataError, DefectReport
from .sources import ImageRef, ImageSource

SHARD_GROUPS = ("MMC4", "LAION")
COMMON_KEYS = ("shards", "weight", "loss_weight", "num_samples", "max_tokens")
GROUP_KEYS = {
    "MMC4": COMMON_KEYS + ("sim_threshold", "max_images", "min_image_kb", "single_image_drop"),
    "LAION": COMMON_KEYS,
}
MAX_TOKENS = {"MMC4": 256, "LAION": 32}  # Otter's --max_tokens for each
LOSS_WEIGHT = {"MMC4": 1.0, "LAION": 0.2}  # Otter's --loss_multiplier_mmc4 / --loss_multiplier_laion defaults
PAIR_IMAGE_EXTS = ("jpg", "png", "jpeg")  # Otter's rename(image="jpg;png;jpeg"): the first one present


@dataclass
class ShardSpec:
    """One shard dataset of the YAML (group MMC4 or LAION), the pattern expanded to absolute paths."""

    name: str
    group: str
    pattern: str
    files: list[str]
    weight: float = 1.0  # sampling: samples per epoch = weight x (num_samples or every prepared sample)
    loss_weight: float = 1.0  # the loss multiplier of this dataset's tokens (default: Otter's, LOSS_WEIGHT)
    num_samples: int = 0  # 0 or -1: every prepared sample per epoch, before `weight`
    max_tokens: int = 256
    sim_threshold: float = 0.32
    max_images: int = 5
    min_image_kb: int = 10  # images with len(raw) // 1000 <= this are dropped (Otter's MIN_KB)
    single_image_drop: float = 0.5

    def epoch_samples(self, prepared: int) -> int:
        """Samples per epoch: `weight` x (num_samples, or every prepared sample), at least 1 when any exist.
        The index draws them afresh every epoch (mimicit.resample_keys: repeats, or a subset)."""
        base = prepared if self.num_samples in (0, -1) else self.num_samples
        if prepared == 0:
            return 0
        return max(1, round(self.weight * base))


# ---- brace patterns ----------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Webdataset's shard patterns (the `braceexpand` rules it uses): `{00000..00003}` is a numeric range, padded
    to the width of its first bound when that has a leading zero, `{a,b}` a list; several braces multiply."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        lo, hi = int(a), int(b)
        width = len(a) if (a.startswith("0") and len(a) > 1) or (b.startswith("0") and len(b) > 1) else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a pattern: a literal brace (braceexpand keeps it too)
        return [head + items[0] + t for t in expand_braces(tail)]
    return [head + i + t for i in items for t in expand_braces(tail)]


# ---- YAML --------------------------------------------------------------------------------------------------

def _number(where: str, key: str, v, kind, lo: float, hi: float | None = None):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise DataError(f"{where}: `{key}` must be {'an integer' if kind is int else 'a number'} {rng}, got {v!r}")
    return kind(v)


def parse_shard_group(path: str, base: str, group: str, datasets) -> list[ShardSpec]:
    """The datasets of one MMC4 / LAION group of the YAML at `path` (relative patterns resolve against `base`)."""
    if datasets is None:
        return []
    if not isinstance(datasets, dict):
        raise DataError(f"{path}: group {group}: expected a mapping of dataset name -> fields")
    out = []
    for name, fields in datasets.items():
        where = f"{path}: {group}.{name}"
        if not isinstance(fields, dict):
            raise DataError(f"{where}: expected a mapping of fields")
        valid = GROUP_KEYS[group]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
        pattern = fields.get("shards")
        if not isinstance(pattern, str) or not pattern.strip():
            raise DataError(f"{where}: `shards` is required: a tar path or brace pattern such as "
                            f"\"shards/{{00000..00009}}.tar\"")
        full = os.path.expanduser(pattern)
        full = full if os.path.isabs(full) else os.path.join(base, full)
        files = [os.path.normpath(f) for f in expand_braces(full)]
        for f in files:
            if not os.path.isfile(f):
                raise DataError(f"{where}: shard does not exist: {f}")
        spec = ShardSpec(name=str(name), group=group, pattern=pattern, files=files, max_tokens=MAX_TOKENS[group],
                         loss_weight=LOSS_WEIGHT[group])
        if "weight" in fields:
            spec.weight = _number(where, "weight", fields["weight"], float, 0.0)
            if spec.weight == 0:
                raise DataError(f"{where}: `weight` must be > 0 (leave the dataset out instead)")
        if "loss_weight" in fields:
            spec.loss_weight = _number(where, "loss_weight", fields["loss_weight"], float, 0.0)
        n = fields.get("num_samples", 0)
        spec.num_samples = _number(where, "num_samples", 0 if n is None else n, int, -1)
        if "max_tokens" in fields:
            spec.max_tokens = _number(where, "max_tokens", fields["max_tokens"], int, 4)
        if "sim_threshold" in fields:
            spec.sim_threshold = _number(where, "sim_threshold", fields["sim_threshold"], float, -1.0, 1.0)
        if "max_images" in fields:
            spec.max_images = _number(where, "max_images", fields["max_images"], int, 1)
        if "min_image_kb" in fields:
            spec.min_image_kb = _number(where, "min_image_kb", fields["min_image_kb"], int, -1)
        if "single_image_drop" in fields:
            spec.single_image_drop = _number(where, "single_image_drop", fields["single_image_drop"], float, 0.0, 1.0)
        out.append(spec)
    return out


# ---- reading a shard ---------------------------------------------------------------------------------------

@dataclass
class Member:
    name: str  # the member's path inside the tar
    offset: int  # byte offset of its data in the tar file
    size: int
    data: bytes


class ShardReadError(Exception):
    """The tar stream broke (not a tar, truncated, corrupt header): the message says after which member."""


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


def iter_samples(path: str, bad) -> Iterator[tuple[str, dict[str, Member]]]:
    """(key, {extension: member}) for each run of consecutive members sharing a key, in tar order, reading the
    tar as a stream (one member in memory at a time). Directories are skipped; extensions are lower-cased.
    A member that fits no sample is reported through `bad(member name, message)` and left out with its sample:
    a file without an extension, a key that returns after other keys (webdataset would make two samples of it),
    a second member of one extension. Raises ShardReadError when the stream breaks (not a tar, truncated, a
    corrupt header): the samples before are kept, the one being assembled is lost."""
    last = "(start of the file)"
    key: str | None = None
    group: dict[str, Member] | None = {}  # None: this key's sample is already refused
    seen: set[str] = set()
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    last = m.name
                    continue
                km = _KEY_EXT.match(m.name)
                k, ext = (km.group(1), km.group(2).lower()) if km else (None, None)
                if km is not None and k != key:
                    if key is not None and group is not None:
                        yield key, group  # complete: a new key starts (before its data is read)
                    key, group = k, {}
                    new_key = True
                else:
                    new_key = False
                fh = tf.extractfile(m)
                data = fh.read() if fh is not None else b""
                if len(data) != m.size:
                    raise ShardReadError(f"member {m.name!r} is cut short ({len(data)} of {m.size} bytes)")
                last = m.name
                if km is None:
                    bad(m.name, "a member without an extension belongs to no sample")
                    continue
                if new_key:
                    if k in seen:
                        bad(m.name, f"key {k!r} appears again after other keys (its members must be adjacent)")
                        group = None
                    seen.add(k)
                if group is None:
                    continue
                if ext in group:
                    bad(m.name, f"a second `.{ext}` member for key {k!r}")
                    group = None
                    continue
                group[ext] = Member(m.name, m.offset_data, m.size, data)
            end = tf.offset
            # tarfile ends a stream quietly at a truncated or corrupt header past the first one; a whole tar
            # ends with a zero block there, so anything else is a broken shard
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
                raise ShardReadError(f"unreadable after member {last!r}: no valid header or end-of-archive "
                                     f"block at byte {end} (truncated or corrupt)")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"unreadable after member {last!r}: {' '.join(str(e).split())}") from None
    if key is not None and group is not None:
        yield key, group


def _is_tar_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"


# ---- the scan: shards -> samples and image rows --------------------------------------------------------------

@dataclass
class ShardScan:
    """What prepare adds to the index from the shards: sources, image rows and samples (media_images as rows of
    `image_rows`, numbered from `row_base`)."""

    sources: list[ImageSource] = field(default_factory=list)
    image_rows: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    documents: int = 0  # samples (keys) read from the shards
    valid: int = 0  # of those, passing every check and filter (counted without a tokenizer too)
    filtered: Counter = field(default_factory=Counter)
    per_dataset: Counter = field(default_factory=Counter)


FILTER_KINDS = {
    "mmc4_small_image": "MMC4 image of 10 KB or less (Otter: len(raw) // 1000 <= 10)",
    "mmc4_low_sim": "MMC4 image whose matched_sim is below sim_threshold",
    "mmc4_extra_image": "MMC4 image beyond the first max_images (5) that passed the filters",
    "mmc4_no_image": "MMC4 document with no image left after the filters",
    "mmc4_no_image_after_truncation": "MMC4 document whose truncated text holds no <image>",
    "mmc4_single_image_dropped": "MMC4 document with one <image>, dropped with probability single_image_drop "
                                 "(seeded by dataset and sample id)",
    "pair_without_caption": "pair without a .txt caption (or an empty one)",
    "pair_without_image": "pair without a .jpg, .png or .jpeg member",
    "truncated": "samples cut to max_tokens (kept)",
    "sample_too_long": "samples longer than prepare's max_seq_len (dropped)",
}

_B64_TEXT = re.compile(rb"^[A-Za-z0-9+/=_\-\s]+$")
_IMAGE_B64_VALUE = re.compile(rb'"image_base64"\s*:\s*"((?:[^"\\]|\\.)*)"', re.S)


def _probe(blobs: list[bytes], is_b64: bool) -> list[tuple]:
    """Headers of encoded images: (error_code, width, height, format, encoded_len, message) each."""
    from .. import _native

    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    buf = b"".join(blobs)
    return _native.probe_images(memoryview(buf).cast("B"), offsets, is_b64)


class _Tokenize:
    """Otter's tokenization of pretraining text: the tokenizer's own special tokens (`add_special_tokens`),
    truncated to max_tokens; labels by Otter's token rule."""

    def __init__(self, tok, info):
        self.tok, self.info = tok, info
        self.extra = tuple(t for t in (tok.bos_token, tok.eos_token, tok.pad_token) if t)

    def ids(self, text: str, max_tokens: int) -> tuple[list[int], bool]:
        full = self.tok(text, add_special_tokens=True)["input_ids"]
        return list(full[:max_tokens]), len(full) > max_tokens


def otter_labels(ids: list[int], media_id: int, eoc_id: int, pad_id: int | None, interleaved: bool) -> list[int]:
    """Otter's pretraining labels (shared reference): the ids, with -100 on padding, the first token, every
    `<image>`, and for interleaved documents every token before the first `<image>` and, after each
    `<|endofchunk|>`, every token up to (not including) the next `<image>`."""
    lab = list(ids)
    n = len(lab)
    for i in range(n):
        if pad_id is not None and ids[i] == pad_id:
            lab[i] = -100
    if n:
        lab[0] = -100
    if interleaved:
        i = 0
        while i < n and ids[i] != media_id:
            lab[i] = -100
            i += 1
        for e in [i for i in range(n) if ids[i] == eoc_id]:
            j = e + 1
            while j < n and ids[j] != media_id:
                lab[j] = -100
                j += 1
    return [-100 if t == media_id else x for t, x in zip(ids, lab)]


def spans_of(labels: list[int]) -> list[int]:
    """Labelled positions as flattened [start, end) spans (the index's label_spans)."""
    out: list[int] = []
    i, n = 0, len(labels)
    while i < n:
        if labels[i] != -100:
            j = i
            while j < n and labels[j] != -100:
                j += 1
            out += [i, j]
            i = j
        else:
            i += 1
    return out


def mmc4_text(sentences: list[str], image_sentences: list[int], eos: str) -> str:
    """Otter's interleaved text: `<|endofchunk|><image>` before each kept image's sentence (once per image), the
    sentences joined by spaces, the first `<|endofchunk|>` removed, spaces around `<image>` and before
    `<|endofchunk|>` removed, then `<|endofchunk|>` and EOS appended."""
    s = list(sentences)
    for ix in image_sentences:
        s[ix] = f"{prompts.EOC}{prompts.IMAGE}{s[ix]}"
    text = " ".join(s).replace(prompts.EOC, "", 1)
    text = (text.replace(" " + prompts.EOC, prompts.EOC).replace(prompts.IMAGE + " ", prompts.IMAGE)
            .replace(" " + prompts.IMAGE, prompts.IMAGE))
    return f"{text}{prompts.EOC}{eos}"


def laion_text(caption: str, eos: str) -> str:
    return f"{prompts.IMAGE}{caption.strip()}{prompts.EOC}{eos}"


def single_image_draw(dataset: str, sample_id: str) -> float:
    """The seeded stand-in for Otter's `random.random()` in the single-image drop: uniform in [0, 1), a function
    of (dataset, sample id) only."""
    return random.Random(f"otterfast/mmc4-single-image/{dataset}/{sample_id}").random()


class _Scanner:
    def __init__(self, specs: list[ShardSpec], report: DefectReport, opts, tok=None, info=None,
                 source_base: int = 0, row_base: int = 0):
        self.report, self.opts = report, opts
        self.t = _Tokenize(tok, info) if tok is not None else None
        self.info = info
        self.out = ShardScan()
        self.source_base, self.row_base = source_base, row_base
        self.src_of: dict[tuple[str, str], int] = {}  # (dataset, encoding) -> source index
        self.specs = specs

    def source(self, spec: ShardSpec, encoding: str) -> int:
        k = (spec.name + "/" + spec.group, encoding)
        if k not in self.src_of:
            self.src_of[k] = self.source_base + len(self.out.sources)
            self.out.sources.append(ImageSource(path=spec.pattern, kind="tar", files=list(spec.files),
                                                encoding=encoding))
        return self.src_of[k]

    def run(self) -> ShardScan:
        for spec in self.specs:
            for fi, path in enumerate(spec.files):
                if _is_tar_compressed(path):
                    raise DataError(f"{path}: compressed tar shards are not supported (images are read by byte "
                                    f"range); unpack it to a plain .tar")
                try:
                    for key, members in iter_samples(path, lambda name, msg: self.report.add("bad_member", path,
                                                                                               name, msg)):
                        self.out.documents += 1
                        self.sample(spec, fi, path, key, members)
                except ShardReadError as e:
                    self.report.add("bad_shard", path, os.path.basename(path), str(e))
        return self.out

    def sample_id(self, spec: ShardSpec, path: str, key: str) -> str:
        # the shard's path as the YAML names it (its pattern's folder) plus the key: unique across shards
        return f"{os.path.join(os.path.dirname(spec.pattern), os.path.basename(path))}/{key}"

    def sample(self, spec: ShardSpec, fi: int, path: str, key: str, members: dict[str, Member]) -> None:
        sid = self.sample_id(spec, path, key)
        if spec.group == "LAION":
            built = self.pair(spec, fi, path, sid, members)
        else:
            built = self.document(spec, fi, path, sid, members)
        if built is None:
            return
        text, images, interleaved = built  # images: (source, ref, image_id, header) in media order
        self.out.valid += 1
        if self.t is None:
            return
        ids, cut = self.t.ids(text, spec.max_tokens)
        info = self.info
        media_pos = [i for i, t in enumerate(ids) if t == info.media_id]
        if interleaved:
            if not media_pos:
                self.out.filtered["mmc4_no_image_after_truncation"] += 1
                return
            if len(media_pos) == 1 and single_image_draw(spec.name, sid) <= spec.single_image_drop:
                self.out.filtered["mmc4_single_image_dropped"] += 1
                return
        elif len(media_pos) != 1:  # a LAION text is `<image>...`: its <image> is always within 32 tokens
            raise AssertionError(f"{sid}: {len(media_pos)} <image> tokens in a pair")
        if len(ids) > self.opts.max_seq_len:
            self.out.filtered["sample_too_long"] += 1
            return
        if cut:
            self.out.filtered["truncated"] += 1
        labels = otter_labels(ids, info.media_id, info.eoc_id, info.pad_id, interleaved)
        rows = []
        for (src, ref, image_id, hdr) in images[: len(media_pos)]:
            rows.append(self.row_base + len(self.out.image_rows))
            w, h, fmt, n = hdr
            self.out.image_rows.append({"image_id": image_id, "source": src, "ref": ref, "width": w, "height": h,
                                        "format": fmt, "encoded_len": n})
        self.out.per_dataset[(spec.group, spec.name)] += 1
        self.out.samples.append({
            "sample_id": sid, "dataset": spec.name, "group": spec.group, "source_ids": [sid],
            "text": self.t.tok.decode(ids), "input_ids": ids, "label_spans": spans_of(labels),
            "media_pos": media_pos, "media_images": [[r] for r in rows], "num_text_tokens": len(ids),
            "num_image_tokens": 0, "num_tokens": len(ids), "context_dropped": 0,
        })

    def _header_ok(self, path: str, image_id: str, probed: tuple) -> tuple | None:
        code, w, h, fmt, n, msg = probed
        if code:
            self.report.add(code, path, image_id, msg)
            return None
        d = imgs.size_defect(w, h, self.opts.max_image_pixels)
        if d is not None:
            self.report.add(d[0], path, image_id, d[1])
            return None
        return int(w), int(h), fmt, int(n)

    def pair(self, spec, fi, path, sid, members):
        txt = members.get("txt")
        ext = next((e for e in PAIR_IMAGE_EXTS if e in members), None)
        if ext is None:
            self.out.filtered["pair_without_image"] += 1
            return None
        if txt is None:
            self.out.filtered["pair_without_caption"] += 1
            return None
        try:
            caption = txt.data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.report.add("bad_member", path, txt.name, f"caption is not UTF-8 text: {e}")
            return None
        caption = prompts._strip_specials(caption, self.t.extra if self.t else ()).strip()
        if not caption:
            self.out.filtered["pair_without_caption"] += 1
            return None
        m = members[ext]
        image_id = f"{sid}.{ext}"
        (probed,) = _probe([m.data], False)
        offset, length, encoding = m.offset, m.size, "raw"
        if probed[0] == "not_an_image" and _B64_TEXT.match(m.data):
            # Otter's converted shards: a member holding base64 text of the image (the range drops outer spaces)
            lead = len(m.data) - len(m.data.lstrip())
            stripped = m.data.strip()
            (probed,) = _probe([stripped], True)
            offset, length, encoding = m.offset + lead, len(stripped), "base64"
        hdr = self._header_ok(path, image_id, probed)
        if hdr is None:
            return None
        ref = ImageRef(file=fi, byte_offset=offset, byte_length=length)
        return laion_text(caption, self.t.tok.eos_token if self.t else ""), \
            [(self.source(spec, encoding), ref, image_id, hdr)], False

    def document(self, spec, fi, path, sid, members):
        m = members.get("json")
        if m is None:
            self.report.add("bad_member", path, sid, f"no .json member (members: {sorted(members)})")
            return None
        try:
            doc = json.loads(m.data)
        except (ValueError, UnicodeDecodeError) as e:
            self.report.add("bad_member", path, m.name, f"malformed JSON: {e}")
            return None
        sentences, infos = (doc.get("text_list"), doc.get("image_info")) if isinstance(doc, dict) else (None, None)
        if not (isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
            self.report.add("bad_member", path, m.name, "`text_list` must be a list of strings")
            return None
        if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
            self.report.add("bad_member", path, m.name, "`image_info` must be a list of objects")
            return None
        # The base64 values' byte ranges inside the member, in file order (checked equal to the parsed values).
        ranges = [(mm.start(1), mm.end(1)) for mm in _IMAGE_B64_VALUE.finditer(m.data)]
        r = 0
        kept = []  # (image_info index, sentence index, raw bytes, range)
        for k, info in enumerate(infos):
            where = f"{m.name}#image_info[{k}]"
            b64, sim, ix = info.get("image_base64"), info.get("matched_sim"), info.get("matched_text_index")
            if not isinstance(b64, str) or isinstance(sim, bool) or not isinstance(sim, (int, float)) \
                    or isinstance(ix, bool) or not isinstance(ix, int):
                self.report.add("bad_member", path, where,
                                "needs `image_base64` (string), `matched_sim` (number), `matched_text_index` (int)")
                return None
            if not 0 <= ix < len(sentences):
                self.report.add("bad_member", path, where,
                                f"matched_text_index {ix} outside text_list (of {len(sentences)})")
                return None
            want = b64.encode("utf-8", "surrogatepass")
            while r < len(ranges):
                a, b = ranges[r]
                r += 1
                raw = m.data[a:b]
                if raw == want or (b"\\" in raw and json.loads(b'"' + raw + b'"') == b64):
                    break
            else:
                self.report.add("bad_member", path, where, "cannot locate the image_base64 value's bytes")
                return None
            try:
                rawbytes = imgs.b64decode(want)
            except (binascii.Error, ValueError, UnicodeEncodeError) as e:
                self.report.add("bad_base64", path, where, f"image text that is not base64: {e}")
                return None
            if len(rawbytes) // 1000 <= spec.min_image_kb:
                self.out.filtered["mmc4_small_image"] += 1
                continue
            if sim < spec.sim_threshold:
                self.out.filtered["mmc4_low_sim"] += 1
                continue
            kept.append((k, ix, rawbytes, (m.offset + a, b - a)))
        if len(kept) > spec.max_images:
            self.out.filtered["mmc4_extra_image"] += len(kept) - spec.max_images
            kept = kept[: spec.max_images]
        if not kept:
            self.out.filtered["mmc4_no_image"] += 1
            return None
        probed = _probe([raw for _, _, raw, _ in kept], False)
        images = []
        for (k, ix, _, (off, length)), p in zip(kept, probed):
            image_id = f"{sid}.json#image_info[{k}]"
            hdr = self._header_ok(path, image_id, p)
            if hdr is None:
                return None
            images.append((ix, (self.source(spec, "base64"), ImageRef(file=fi, byte_offset=off, byte_length=length),
                                image_id, hdr)))
        images.sort(key=lambda x: x[0])  # media in sentence order, as their <image> tokens (stable within one)
        extra = self.t.extra if self.t else ()
        text = mmc4_text([prompts._strip_specials(s, extra) for s in sentences], [ix for ix, _ in images],
                         self.t.tok.eos_token if self.t else "")
        return text, [im for _, im in images], True


def scan(specs: list[ShardSpec], report: DefectReport, opts, tok=None, info=None, source_base: int = 0,
         row_base: int = 0) -> ShardScan:
    """Read every shard once. Without a tokenizer (`data validate`) only the checks and the image filters run;
    with one, the samples are built (token-level filters, truncation, labels)."""
    if tok is not None and (info.media_id is None or info.eoc_id is None):
        raise DataError("pretraining shards need a prompt format with <image> in the text (simple, llama2, idefics)")
    return _Scanner(specs, report, opts, tok, info, source_base, row_base).run()


# ---- loss weights ----------------------------------------------------------------------------------------------

def sample_loss_weights(index) -> np.ndarray | None:
    """Per index row, its dataset's `loss_weight` (meta.json datasets; MIMIC-IT datasets 1.0); None when every
    weight is 1.0 (the trainer then adds nothing to its batches)."""
    by_ds = {(d["group"], d["name"]): float(d.get("loss_weight", 1.0)) for d in index.meta["datasets"]}
    if all(w == 1.0 for w in by_ds.values()):
        return None
    groups = index.samples.column("group").to_pylist()
    names = index.samples.column("dataset").to_pylist()
    return np.asarray([by_ds.get((g, n), 1.0) for g, n in zip(groups, names)], dtype=np.float32)


def token_loss_weights(batch: dict, sample_weight: np.ndarray) -> np.ndarray:
    """(B, T) float32: each token's weight = its sample's (`sample_weight[index row]`), 0 on pads. A batch's
    samples are laid out row by row in `sample_index` order, the k-th of a row with segment id k (reference.py)."""
    seg = np.asarray(batch["segment_ids"])
    rows = np.asarray(batch["sample_index"])
    per_row = seg.max(axis=1, initial=-1).astype(np.int64) + 1  # samples in each row
    start = np.concatenate([[0], np.cumsum(per_row)[:-1]])  # each row's first sample in sample_index
    w = sample_weight[rows] if len(rows) else np.zeros(0, np.float32)
    pos = np.where(seg >= 0, start[:, None] + seg, 0)
    return np.where(seg >= 0, w[pos] if len(w) else 0.0, 0.0).astype(np.float32)
