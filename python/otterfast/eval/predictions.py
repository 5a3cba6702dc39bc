"""The predictions file: one JSON object per line, `{"row": i, "reply": "..."}` plus optional fields."""

from __future__ import annotations

import json


class PredictionsError(ValueError):
    pass


def read_predictions(path: str, n_rows: int | None = None) -> dict[int, dict]:
    out: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError as e:
                raise PredictionsError(f"{path}:{ln}: not JSON ({e})") from e
            if not isinstance(line, dict) or "row" not in line or ("reply" not in line and "logliks" not in line):
                raise PredictionsError(f'{path}:{ln}: expected {{"row": i, "reply": "..."}}')
            row = line["row"]
            if not isinstance(row, int) or isinstance(row, bool) or row < 0:
                raise PredictionsError(f"{path}:{ln}: row {row!r} is not a 0-based row number")
            if n_rows is not None and row >= n_rows:
                raise PredictionsError(f"{path}:{ln}: row {row} but the data has {n_rows} rows")
            if row in out:
                raise PredictionsError(f"{path}:{ln}: row {row} appears twice")
            if line.get("reply") is not None and not isinstance(line["reply"], str):
                raise PredictionsError(f"{path}:{ln}: reply is not a string")
            out[row] = line
    return out


def write_line(f, line: dict) -> None:
    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    f.flush()
