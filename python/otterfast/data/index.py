"""The prepared index: memory-mapped Arrow tables plus meta.json and the tokenizer it was made with.

Also the per-epoch sample order, shared by every loader so that the reference and native loaders
see the same samples: per dataset, Otter's `num_samples` rule drawn afresh each epoch, then one
shuffle of everything, then a disjoint, complete shard per data-parallel rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .mimicit import resample_keys
from .sources import ImageRef, ImageSource


def arrow_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A primitive Arrow column without nulls as a numpy view (no copy). pyarrow's own `to_numpy` imports pandas on
    first use, ~0.6 s of a loader's construction-to-first-batch in a fresh process (measured)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.null_count or not pa.types.is_primitive(arr.type) or pa.types.is_boolean(arr.type):
        return np.asarray(arr.to_pylist())
    dtype = np.dtype(arr.type.to_pandas_dtype())
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _open_arrow(path: str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


@dataclass
class Sample:
    sample_id: str
    dataset: str
    group: str
    source_ids: list[str]
    text: str
    input_ids: list[int]
    label_spans: list[tuple[int, int]]
    media_pos: list[int]
    media_images: list[list[int]]
    num_text_tokens: int
    num_image_tokens: int
    num_tokens: int
    context_dropped: int
    row: int = -1  # this sample's row in the index


class PreparedIndex:
    def __init__(self, path: str):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path}: not a prepared index (no meta.json); run `otterfast data prepare`")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.samples = _open_arrow(os.path.join(path, "samples.arrow"))
        # `data repack` writes its own images table and names it here (repack.py)
        self.images = _open_arrow(os.path.join(path, self.meta.get("images_file", "images.arrow")))
        self.sources = [ImageSource.from_dict(d) for d in self.meta["sources"]]
        self.format: str = self.meta["options"]["format"]
        self.max_seq_len: int = self.meta["options"]["max_seq_len"]
        self.tok = self.meta["tokenizer"]
        self._num_tokens = arrow_numpy(self.samples.column("num_tokens"))
        self._dataset = list(zip(self.samples.column("group").to_pylist(), self.samples.column("dataset").to_pylist()))

    def __len__(self) -> int:
        return self.samples.num_rows

    def check_image_files(self) -> None:
        """DataError unless the image tables are the files this index was prepared from (size and mtime; stat only,
        fingerprint.py). The loaders call it when built; an index without fingerprints is refused here."""
        from .fingerprint import check_image_files

        check_image_files(self.meta, self.path)

    def fingerprint(self) -> str:
        """A digest of what decides this index's batch plans: its inputs' fingerprints, prepare options, datasets
        (with num_samples) and every sample's token count and dataset. A resume compares it (train/checkpoint.py)."""
        h = hashlib.sha256()
        keys = ("inputs", "options", "datasets", "counts")
        h.update(json.dumps({k: self.meta.get(k) for k in keys}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self._num_tokens, dtype=np.int64).tobytes())
        h.update(json.dumps(self._dataset).encode())
        return h.hexdigest()

    def num_tokens(self) -> np.ndarray:
        return self._num_tokens

    def sample(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (index holds {len(self)})")
        row = {k: self.samples.column(k)[i].as_py() for k in self.samples.column_names}
        sp = row["label_spans"]
        row["label_spans"] = list(zip(sp[::2], sp[1::2]))
        return Sample(**row, row=i)

    def image(self, row: int) -> dict:
        return {k: self.images.column(k)[row].as_py() for k in self.images.column_names}

    def image_ref(self, row: int) -> tuple[int, ImageRef]:
        d = self.image(row)
        return d["source"], ImageRef(d["file"], d["row_group"], d["row"], d["byte_offset"], d["byte_length"])

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.join(self.path, "tokenizer"), local_files_only=True)

    # ---- order -------------------------------------------------------------------------------------

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's sample rows for `epoch`.

        Each dataset's `num_samples` is applied with a generator seeded by (seed, epoch), so a
        subsampled dataset shows a different subset every epoch and a repeated one draws its remainder
        anew (Otter draws once with seed 0, and its sampler repeats one order every epoch). The union is
        shuffled with the same generator. Rank r takes positions r, r + world_size, ...: shards are
        disjoint and together complete; their lengths differ by at most one.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        rng = random.Random(f"otterfast/{seed}/{epoch}")
        rows_by_ds: dict[tuple[str, str], list[int]] = {}
        for i, d in enumerate(self._dataset):
            rows_by_ds.setdefault(d, []).append(i)
        order: list[int] = []
        for d in self.meta["datasets"]:
            rows = rows_by_ds.get((d["group"], d["name"]), [])
            order += resample_keys(rows, d["num_samples"], rng)
        rng.shuffle(order)
        return order[rank::world_size]
