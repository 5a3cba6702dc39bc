//! Parquet image tables, streamed: one column of one row group, page by page, never the whole chunk.
//!
//! Otter's tables are usually written by pandas with one row group per file, so "read a row group" means
//! "read every image". The low-level parquet reader decodes pages as it goes, so memory stays at a page and
//! one batch of values whatever the table's size.

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::fs::File;

use crate::error::{Error, Result};

/// Stream `column` of `row_group` in `path` and call `visit(row, Some(bytes) | None)` for each row in
/// `rows` (sorted ascending, rows within the row group). Rows not asked for are decoded and dropped.
/// A corrupt file is an error naming it, also where the parquet crate panics on it (it does on some corrupt
/// footers: "column start and length should not be negative", tests/test_native_fuzz.py).
pub fn for_each_row<F: FnMut(usize, Option<&[u8]>)>(
    path: &str,
    column: &str,
    row_group: usize,
    rows: &[usize],
    visit: F,
) -> Result<()> {
    crate::error::catch_panic(
        || stream_rows(path, column, row_group, rows, visit),
        |m| Error::File {
            file: path.to_string(),
            cause: format!("row group {row_group}: the parquet reader failed on corrupt data: {m}"),
        },
    )
}

fn stream_rows<F: FnMut(usize, Option<&[u8]>)>(
    path: &str,
    column: &str,
    row_group: usize,
    rows: &[usize],
    mut visit: F,
) -> Result<()> {
    let err = |cause: String| Error::File {
        file: path.to_string(),
        cause,
    };
    if rows.windows(2).any(|w| w[1] <= w[0]) {
        return Err(err("rows must be sorted and unique".into()));
    }
    let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| err(format!("not a readable parquet file: {e}")))?;
    let meta = reader.metadata();
    if row_group >= meta.num_row_groups() {
        return Err(err(format!(
            "row group {row_group} out of range ({} row groups)",
            meta.num_row_groups()
        )));
    }
    let schema = meta.file_metadata().schema_descr();
    let col = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().string() == column)
        .ok_or_else(|| err(format!("no column {column:?}")))?;
    let descr = schema.column(col);
    if descr.physical_type() != PhysicalType::BYTE_ARRAY {
        return Err(err(format!(
            "column {column:?} is {:?}, expected BYTE_ARRAY",
            descr.physical_type()
        )));
    }
    let max_def = descr.max_def_level();
    let rg = reader
        .get_row_group(row_group)
        .map_err(|e| err(format!("row group {row_group}: {e}")))?;
    let n_rows = rg.metadata().num_rows() as usize;
    if let Some(&last) = rows.last() {
        if last >= n_rows {
            return Err(err(format!(
                "row {last} out of range (row group {row_group} has {n_rows} rows)"
            )));
        }
    }
    let mut typed = match rg
        .get_column_reader(col)
        .map_err(|e| err(format!("column {column:?}: {e}")))?
    {
        ColumnReader::ByteArrayColumnReader(r) => r,
        _ => return Err(err(format!("column {column:?} is not a byte-array column"))),
    };
    let mut values: Vec<ByteArray> = Vec::with_capacity(1);
    let mut defs: Vec<i16> = Vec::with_capacity(1);
    let mut row = 0usize;
    for &next in rows {
        if next > row {
            // Whole pages between wanted rows are skipped from their headers, without decompressing them.
            let skipped = typed.skip_records(next - row).map_err(|e| {
                err(format!(
                    "row group {row_group}, skipping to row {next}: {e}"
                ))
            })?;
            row += skipped;
            if row != next {
                return Err(err(format!(
                    "row group {row_group} ended at row {row}, before row {next}"
                )));
            }
        }
        values.clear();
        defs.clear();
        let (records, _values, _levels) = typed
            .read_records(
                1,
                if max_def > 0 { Some(&mut defs) } else { None },
                None,
                &mut values,
            )
            .map_err(|e| err(format!("row group {row_group}, row {row}: {e}")))?;
        if records != 1 {
            return Err(err(format!("row group {row_group} ended at row {row}")));
        }
        // A file whose levels and values disagree is corrupt: an error, not an index out of bounds.
        let present = max_def == 0 || defs.first() == Some(&max_def);
        let value = match (present, values.first()) {
            (true, Some(v)) => Some(v.data()),
            (true, None) => {
                return Err(err(format!(
                    "row group {row_group}, row {row}: no value for a non-null row"
                )))
            }
            (false, _) => None,
        };
        visit(row, value);
        row += 1;
    }
    Ok(())
}
