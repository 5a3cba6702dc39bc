//! `otterfast._native`: the bulk byte work of otterfast, bound to Python with PyO3.
//!
//! This file and loader.rs only bind; each stage lives in its own module:
//!
//!   header.rs   image headers and base64 (data prepare's probe)   complete.rs  is the data all there
//!   shard.rs    parquet image columns, streamed        blobs.rs   the image window's encoded bytes
//!   decode.rs   bytes -> RGB                            transform.rs  RGB -> Otter/CLIP pixels, Fuyu patches
//!   pixels.rs   which transform, per loader             layout.rs  a batch's tokens, media and pixel slots
//!   index.rs    the prepared index, checked             config.rs  the loader options (LoaderConfig)
//!   pack.rs     the epoch plan                          pipeline.rs  producer thread, pool, queue
//!   error.rs    the one error type                    limits.rs  the largest image and resize allowed
//!   pixel_cache.rs  images as 8-bit squares, decoded once
//!
//! Every function releases the GIL around its work and turns failures into Python exceptions (through
//! `From<Error> for PyErr` below) or per-item error codes, never panics.

pub mod blobs;
pub mod complete;
pub mod config;
pub mod decode;
pub mod error;
pub mod header;
pub mod index;
pub mod layout;
pub mod limits;
pub mod pack;
pub mod pipeline;
pub mod pixel_cache;
pub mod pixels;
pub mod shard;
pub mod transform;

mod loader;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::error::Error;

/// The one place errors become Python exceptions: the machine's failures (threads, bugs) a RuntimeError,
/// everything the data or the arguments caused a ValueError (data/loader.py raises it on as DataError).
/// The message is the error's Display, which names the file, dataset, sample or image id it knows.
impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Runtime(_) => PyRuntimeError::new_err(e.to_string()),
            _ => PyValueError::new_err(e.to_string()),
        }
    }
}

/// One probed image: (error_code, width, height, format, encoded_len, message).
/// error_code is "" on success; then message is "".
type ProbeRow = (&'static str, u32, u32, &'static str, usize, String);

fn probe_row(blob: &[u8], is_base64: bool) -> ProbeRow {
    // header.rs catches the header readers' panics; this one catches the rest (base64), so that one image can
    // never end a whole probe: prepare records it as a defect naming the file and the image id.
    let probed = error::catch_panic(
        || header::probe_blob(blob, is_base64),
        |m| Error::BadHeader(format!("the header probe panicked: {m}")),
    );
    match probed {
        Ok(h) => (
            "",
            h.width,
            h.height,
            h.format,
            h.encoded_len,
            String::new(),
        ),
        Err(e) => (e.code(), 0, 0, "", 0, e.to_string()),
    }
}

/// Read the headers of many encoded images at once, in parallel, without the GIL.
///
/// `data` is one contiguous buffer (e.g. an Arrow binary/string column's data buffer) and `offsets`
/// (int64, n+1 entries) delimit its items, so no Python object is made per image. With
/// `is_base64`, each item is base64 text (standard or URL-safe alphabet).
#[pyfunction]
#[pyo3(signature = (data, offsets, is_base64))]
fn probe_images(
    py: Python<'_>,
    data: PyBuffer<u8>,
    offsets: PyBuffer<i64>,
    is_base64: bool,
) -> PyResult<Vec<ProbeRow>> {
    if !data.is_c_contiguous() || !offsets.is_c_contiguous() {
        return Err(Error::Invalid("probe_images: buffers must be C-contiguous".into()).into());
    }
    let offs: Vec<i64> = offsets.to_vec(py)?;
    let n_bytes = data.len_bytes();
    for w in offs.windows(2) {
        if w[0] < 0 || w[1] < w[0] || w[1] as usize > n_bytes {
            return Err(Error::Invalid(format!(
                "probe_images: offsets out of range ({}..{} in a buffer of {} bytes)",
                w[0], w[1], n_bytes
            ))
            .into());
        }
    }
    let ptr = data.buf_ptr() as usize;
    // SAFETY: `data` (a PyBuffer) keeps the exporter's memory alive and unmoved until it is dropped,
    // which happens after `detach` returns; the buffer is only read.
    let rows = py.detach(move || {
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(ptr as *const u8, n_bytes) };
        offs.par_windows(2)
            .map(|w| probe_row(&bytes[w[0] as usize..w[1] as usize], is_base64))
            .collect::<Vec<ProbeRow>>()
    });
    drop(data);
    Ok(rows)
}

/// Probe the images at `rows` (sorted row numbers within `row_group`) of a parquet image table, streaming
/// the column page by page without the GIL. Returns one row per requested row, as `probe_images`, with
/// the error code "null_image" for a null value. Raises ValueError naming the file on a read error.
#[pyfunction]
#[pyo3(signature = (path, column, row_group, rows, is_base64))]
fn probe_parquet_rows(
    py: Python<'_>,
    path: String,
    column: String,
    row_group: usize,
    rows: Vec<usize>,
    is_base64: bool,
) -> PyResult<Vec<ProbeRow>> {
    py.detach(move || {
        let mut blobs: Vec<Option<Vec<u8>>> = Vec::with_capacity(rows.len());
        let mut out: Vec<ProbeRow> = Vec::with_capacity(rows.len());
        // Probe in chunks so that memory stays at a few images even for a huge row group.
        let flush = |blobs: &mut Vec<Option<Vec<u8>>>, out: &mut Vec<ProbeRow>| {
            let probed: Vec<ProbeRow> = blobs
                .par_iter()
                .map(|b| match b {
                    None => (
                        Error::NullImage.code(),
                        0,
                        0,
                        "",
                        0,
                        Error::NullImage.to_string(),
                    ),
                    Some(bytes) => probe_row(bytes, is_base64),
                })
                .collect();
            out.extend(probed);
            blobs.clear();
        };
        shard::for_each_row(&path, &column, row_group, &rows, |_row, value| {
            blobs.push(value.map(|v| v.to_vec()));
            if blobs.len() == 32 {
                flush(&mut blobs, &mut out);
            }
        })?;
        flush(&mut blobs, &mut out);
        Ok(out)
    })
}

/// Decode one base64 payload (standard or URL-safe) to bytes; a ValueError on bad input.
#[pyfunction]
fn decode_base64(py: Python<'_>, text: &[u8]) -> PyResult<Py<pyo3::types::PyBytes>> {
    let out = header::decode_base64(text)?;
    Ok(pyo3::types::PyBytes::new(py, &out).unbind())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(probe_images, m)?)?;
    m.add_function(wrap_pyfunction!(decode_base64, m)?)?;
    m.add_function(wrap_pyfunction!(probe_parquet_rows, m)?)?;
    loader::register(m)?;
    Ok(())
}
