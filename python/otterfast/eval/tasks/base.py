"""What every task provides, and helpers they share."""

from __future__ import annotations

import os
from typing import Any

from ..data import Item, Layout, Loaded, read_rows


class TaskError(ValueError):
    pass


class Task:
    """A benchmark: layouts it reads, the question text it asks, how a reply is parsed and how rows are scored.

    Subclasses set `name`, `layouts`, `options` (option -> default; a config may set only these) and implement
    `fields`, `question`, `parse_line` and `metrics`.
    """

    name = ""
    layouts: list[Layout] = []
    options: dict[str, Any] = {"prompt": "otter"}
    modes: tuple[str, ...] = ("generate",)
    needs_judge = False

    # ------------------------------------------------------------ configuration
    def resolve_options(self, given: dict | None) -> dict:
        given = dict(given or {})
        bad = sorted(set(given) - set(self.options))
        if bad:
            raise TaskError(f"{self.name}: unknown option(s) {bad}; valid: {sorted(self.options)}")
        opts = {**self.options, **given}
        if "mode" in opts and opts["mode"] not in self.modes:
            raise TaskError(f"{self.name}: mode {opts['mode']!r}; valid: {list(self.modes)}")
        if opts.get("prompt") not in ("otter", "lmms"):
            raise TaskError(f"{self.name}: prompt {opts.get('prompt')!r}; valid: ['lmms', 'otter']")
        return opts

    def mode(self, opts: dict) -> str:
        return opts.get("mode", "generate")

    # ------------------------------------------------------------ data
    def load(self, path: str, with_images: bool = False) -> Loaded:
        lay, rows, cells, n, cols = read_rows(path, self.name, self.layouts, with_images)
        base = os.path.dirname(os.path.abspath(path))
        items = []
        for i, (rec, cell) in enumerate(zip(rows, cells)):
            it = Item(row=i, fields=self.fields(lay, rec), base_dir=base)
            if with_images:
                from ..images import count_images

                it.image_cell, it.n_images = cell, count_images(cell)
            else:
                it.n_images = int(cell or 0)
            items.append(it)
        self.check(items, path)
        return Loaded(items=items, layout=lay.name, path=path, n_rows=n, columns=cols)

    def fields(self, lay: Layout, rec: dict) -> dict:
        raise NotImplementedError

    def check(self, items: list[Item], path: str) -> None:
        """Whole-file checks (e.g. MME pairs); raise TaskError."""

    def subset(self, items: list[Item], limit: int | None) -> list[Item]:
        return items if limit is None else items[:limit]

    def skip(self, item: Item, opts: dict) -> str | None:
        """A reason to leave a row out of generation and of every denominator, or None."""
        return None

    # ------------------------------------------------------------ prompting
    def question(self, item: Item, opts: dict) -> str:
        raise NotImplementedError

    def extra_questions(self, item: Item, opts: dict) -> dict[str, str]:
        """Further generations per row, saved as `<name>_reply` (MagnifierBench's free-form question)."""
        return {}

    def loglik_options(self, item: Item, opts: dict) -> tuple[list[str], list[str]]:
        """(letters, option texts) for likelihood scoring."""
        raise TaskError(f"{self.name}: no likelihood mode")

    # ------------------------------------------------------------ scoring
    def parse_line(self, item: Item, line: dict, opts: dict) -> Any:
        raise NotImplementedError

    def metrics(self, items: list[Item], lines: dict[int, dict], opts: dict, judge=None) -> tuple[dict, list[dict]]:
        raise NotImplementedError


def grouped(items: list[Item], key) -> "dict[Any, list[Item]]":
    """Items by `key(item)`, groups and items in file order (MME's image pairs, MMBench's circular groups)."""
    out: dict[Any, list[Item]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def first_groups(items: list[Item], groups: "dict[Any, list[Item]]", n: int) -> list[Item]:
    """The items of the first `n` groups, in file order: a `--limit` that never splits a group."""
    rows = {it.row for g in list(groups.values())[:n] for it in g}
    return [it for it in items if it.row in rows]


def frac(num: float, den: float) -> float:
    """A fraction that is 0.0 (not None, not NaN) on an empty denominator (trap 8: a zero score is 0)."""
    return float(num) / den if den else 0.0


def accuracy_by(samples: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[bool]] = {}
    for s in samples:
        k = s.get(key)
        if k is None:
            continue
        for kk in (k if isinstance(k, (list, tuple)) else [k]):  # a list field (MathVista skills): each element
            groups.setdefault(str(kk), []).append(bool(s["correct"]))
    return {k: {"n": len(v), "accuracy": frac(sum(v), len(v))} for k, v in sorted(groups.items())}


def text(v: Any) -> str:
    return "" if v is None else str(v)


def options_block(letters: list[str], texts: list[str], fmt: str = "{l}. {t}", sep: str = "\n") -> str:
    return sep.join(fmt.format(l=l, t=t) for l, t in zip(letters, texts))
