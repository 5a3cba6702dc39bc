"""Image tables in every layout Otter's data comes in."""

import base64
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otterfast.data.defects import DataError
from otterfast.data.images import b64decode
from otterfast.data.sources import BlobReader, open_image_source, scan_ids
from conftest import encode_image


def _roundtrip(path):
    src = open_image_source(path)
    reader = BlobReader([src])
    out = {}
    for image_id, ref in scan_ids(src):
        blob = reader.read(0, ref)
        out[image_id] = b64decode(blob) if src.encoding == "base64" else blob
    return src, out


@pytest.fixture
def imgs():
    return {f"X_IMG_{i}": encode_image(5 + i, 7, "PNG", seed=i) for i in range(5)}


def test_pandas_index_base64(tmp_path, imgs):
    import pandas as pd

    p = str(tmp_path / "t.parquet")
    pd.DataFrame({"base64": [base64.b64encode(v).decode() for v in imgs.values()]}, index=list(imgs)).to_parquet(p)
    src, out = _roundtrip(p)
    assert src.encoding == "base64" and out == imgs


def test_named_pandas_index_urlsafe(tmp_path, imgs):
    import pandas as pd

    p = str(tmp_path / "t.parquet")
    df = pd.DataFrame({"base64": [base64.urlsafe_b64encode(v).decode() for v in imgs.values()]},
                      index=pd.Index(list(imgs), name="image_id"))
    df.to_parquet(p)
    src, out = _roundtrip(p)
    assert src.id_column == "image_id" and out == imgs


def test_id_column_raw_bytes_many_row_groups(tmp_path, imgs):
    p = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": list(imgs), "bytes": pa.array(list(imgs.values()), pa.binary())}), p,
                   row_group_size=2)
    src, out = _roundtrip(p)
    assert src.encoding == "raw" and out == imgs


def test_dask_directory(tmp_path, imgs):
    import pandas as pd

    d = tmp_path / "t.parquet"
    d.mkdir()
    items = list(imgs.items())
    for k, chunk in enumerate([items[:2], items[2:]]):
        pd.DataFrame({"base64": [base64.b64encode(v).decode() for _, v in chunk]},
                     index=[i for i, _ in chunk]).to_parquet(d / f"part.{k}.parquet")
    src, out = _roundtrip(str(d))
    assert len(src.files) == 2 and out == imgs


def test_legacy_json_with_escapes(tmp_path, imgs):
    p = tmp_path / "t.json"
    # json.dumps does not escape '/', but other writers do ("\/"); both must read back.
    text = json.dumps({k: base64.b64encode(v).decode() for k, v in imgs.items()}).replace("/", "\\/")
    p.write_text(text)
    src, out = _roundtrip(str(p))
    assert src.kind == "json" and out == imgs


def test_legacy_json_malformed(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{"a": "AAAA", "b": 12}')
    with pytest.raises(DataError, match="malformed JSON"):
        list(scan_ids(open_image_source(str(p))))


def test_wrong_schema_lists_columns(tmp_path):
    p = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": ["a"], "pixels": [1]}), p)
    with pytest.raises(DataError, match="wrong parquet schema") as e:
        open_image_source(p)
    assert "pixels" in str(e.value) and "t.parquet" in str(e.value)


def test_no_id(tmp_path):
    p = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"base64": ["AAAA"]}), p)
    with pytest.raises(DataError, match="no image ids"):
        open_image_source(p)


def test_not_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    p.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        open_image_source(str(p))
