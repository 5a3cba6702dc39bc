"""Read a benchmark's local parquet file through the column layout it was published in.

Each task lists its layouts (Otter-AI, lmms-lab, HuggingFaceM4, AI4Math). The first layout whose required columns
are all present wins; a file matching none is an error that names, per layout, the columns it misses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # image columns, first present one is used; read only when images are wanted


@dataclass
class Item:
    """One benchmark row in a task's own terms (fields named by the task, not by the file)."""

    row: int
    fields: dict[str, Any]
    image_cell: Any = None
    base_dir: str | None = None
    n_images: int = 0

    def __getitem__(self, k: str) -> Any:
        return self.fields[k]

    def get(self, k: str, default: Any = None) -> Any:
        return self.fields.get(k, default)

    def images(self) -> list:
        from .images import to_pil_list

        return to_pil_list(self.image_cell, self.base_dir, f"row {self.row} image")


@dataclass
class Loaded:
    items: list[Item]
    layout: str
    path: str
    n_rows: int
    columns: list[str] = field(default_factory=list)


def missing_value(v: Any) -> bool:
    """None, NaN and the literal string "nan" (how pandas-exported files spell a missing hint) are all missing."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and v.strip().lower() in ("", "nan", "none"):
        return True
    return False


def choose_layout(task: str, layouts: list[Layout], columns: list[str], path: str) -> Layout:
    present = set(columns)
    for lay in layouts:
        if set(lay.required) <= present and (not lay.images or present & set(lay.images)):
            return lay
    lines = []
    for lay in layouts:
        miss = [c for c in lay.required if c not in present]
        if lay.images and not present & set(lay.images):
            miss.append(" or ".join(lay.images))
        lines.append(f"layout {lay.name!r} misses {miss}")
    raise LayoutError(f"{path}: no known {task} layout: " + "; ".join(lines) + f"; columns present: {sorted(present)}")


def read_rows(path: str, task: str, layouts: list[Layout], with_images: bool) -> tuple[Layout, list[dict], list, int,
                                                                                       list[str]]:
    """Rows as dicts (layout columns only) and, if wanted, the image cell of each row."""
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such parquet file")
    schema = pq.read_schema(path)
    columns = list(schema.names)
    lay = choose_layout(task, layouts, columns, path)
    cols = [c for c in (*lay.required, *lay.optional) if c in columns]
    img_cols = [c for c in lay.images if c in columns]
    table = pq.read_table(path, columns=list(dict.fromkeys(cols + img_cols)))
    rows = table.select(cols).to_pylist()
    # Several image columns (AI4Math: decoded_image, then the `image` path): per row, the first that is not null.
    if not img_cols:
        cells: list = [None] * len(rows)
    elif with_images:
        per_col = [table.column(c).to_pylist() for c in img_cols]
        cells = [next((col[i] for col in per_col if col[i] is not None), None) for i in range(len(rows))]
    else:
        # Scoring needs only how many images a row has (MagnifierBench skips multi-image rows), not the pixels.
        per_col = [_image_counts(table.column(c)) for c in img_cols]
        cells = [next((col[i] for col in per_col if col[i]), 0) for i in range(len(rows))]
    return lay, rows, cells, table.num_rows, columns


def _image_counts(col) -> list[int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lens = pc.list_value_length(col).to_pylist()
        return [0 if n is None else int(n) for n in lens]
    valid = pc.is_valid(col).to_pylist()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        lengths = pc.utf8_length(col).to_pylist()
        return [int(bool(v and n)) for v, n in zip(valid, lengths)]
    return [int(bool(v)) for v in valid]
