"""Defects in user data: what went wrong, where (file and id), and what `--on-error` does about it.

Structural problems (a malformed YAML or JSON file, an unknown group, a missing path, an image table
whose schema we cannot read) always raise: nothing sensible can be skipped. Record-level problems
(a missing field, a missing image, bad bytes, ...) are collected during validation; with
`on_error="raise"` (the default) every one of them is listed in one DataError at the end of
validation, with `on_error="skip"` the affected sample (or context turn) is left out and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# kind -> what it means; the keys are the names counted in reports.
DEFECT_KINDS = {
    "missing_instruction": "record without an `instruction`",
    "missing_answer": "record without an `answer`",
    "missing_rel_ins_id": "a `rel_ins_ids` / train-config entry names an instruction id that does not exist",
    "missing_query_id": "a train-config key names an instruction id that does not exist",
    "duplicate_instruction_id": "the same instruction id in two instruction files of one group",
    "duplicate_image_id": "the same image id twice in the image tables of one group",
    "missing_image_id": "an `image_ids` entry that no image table of the group holds",
    "no_images": "a record in an image group with no `image_ids`",
    "null_image": "an image row whose bytes are null",
    "bad_base64": "image text that is not base64",
    "not_an_image": "bytes that are not a JPEG, PNG, WebP or GIF image",
    "bad_header": "an image whose header is truncated or corrupt",
    "unreadable_table": "an image whose parquet page cannot be read (a corrupt or truncated table file)",
    "image_too_large": "an image whose header declares more pixels than --max-image-pixels (decompression bomb)",
    "extreme_aspect_ratio": "an image whose long side is over 200 x its short side (images.MAX_ASPECT_RATIO)",
    "truncated_image": "an image whose data ends before the image does (a JPEG without its end-of-image marker, "
                       "a WebP shorter than its RIFF size, a GIF frame cut short)",
    "bad_shard": "a tar shard that cannot be read to its end (not a tar, truncated, corrupt header; data/shards.py)",
    "bad_member": "a shard member that makes no valid sample (malformed JSON, missing fields, stray member)",
}

# Not defects: consequences of max_seq_len, always counted, never an error.
TRUNCATION_KINDS = {
    "context_dropped": "in-context examples / earlier turns dropped so that the sample fits max_seq_len",
    "sample_too_long": "samples dropped because even the query alone does not fit max_seq_len",
}


class DataError(ValueError):
    """Bad input data. The message names the file and the id."""


class DefectsFound(DataError):
    """The defects of a whole validation in raise mode: a first line with the count, then one line per kind and per
    example (the CLI prints it as it is; any other error is one line)."""


@dataclass
class Defect:
    kind: str
    path: str
    id: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.path}: id {self.id!r}: {self.message}"


@dataclass
class DefectReport:
    on_error: str = "raise"
    max_examples: int = 20
    counts: Counter = field(default_factory=Counter)
    examples: list[Defect] = field(default_factory=list)
    truncation: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {self.on_error!r}")

    def add(self, kind: str, path: str, id: str, message: str = "") -> None:
        assert kind in DEFECT_KINDS, kind
        self.counts[kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(Defect(kind, str(path), str(id), message or DEFECT_KINDS[kind]))

    def count_truncation(self, kind: str, n: int = 1) -> None:
        assert kind in TRUNCATION_KINDS, kind
        self.truncation[kind] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def raise_if_needed(self) -> None:
        """In raise mode, one DataError listing every defect kind and the first examples."""
        if self.on_error == "raise" and self.total:
            lines = [f"{self.total} data defect(s) found (use --on-error skip to leave them out and count them):"]
            lines += [f"  {kind}: {n}" for kind, n in sorted(self.counts.items())]
            lines.append("first examples:")
            lines += [f"  {d}" for d in self.examples]
            raise DefectsFound("\n".join(lines))

    def as_dict(self) -> dict:
        return {
            "on_error": self.on_error,
            "defects": dict(sorted(self.counts.items())),
            "truncation": dict(sorted(self.truncation.items())),
            "examples": [d.__dict__ for d in self.examples],
        }
