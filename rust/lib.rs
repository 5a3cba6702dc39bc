//! `otterfast._native`: the bulk byte work of otterfast, bound to Python with PyO3.
//!
//! This file only binds; each stage lives in its own module. Every function releases the GIL around
//! its work and turns failures into Python exceptions or per-item error codes, never panics.

pub mod decode;
pub mod header;
pub mod pack;
pub mod pipeline;
pub mod shard;
pub mod transform;

mod loader;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::prelude::*;

/// One probed image: (error_code, width, height, format, encoded_len, message).
/// error_code is "" on success; then message is "".
type ProbeRow = (&'static str, u32, u32, &'static str, usize, String);

fn probe_row(blob: &[u8], is_base64: bool) -> ProbeRow {
    match header::probe_blob(blob, is_base64) {
        Ok(h) => (
            "",
            h.width,
            h.height,
            h.format,
            h.encoded_len,
            String::new(),
        ),
        Err(e) => (e.code(), 0, 0, "", 0, e.message()),
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
        return Err(PyValueError::new_err(
            "probe_images: buffers must be C-contiguous",
        ));
    }
    let offs: Vec<i64> = offsets.to_vec(py)?;
    let n_bytes = data.len_bytes();
    for w in offs.windows(2) {
        if w[0] < 0 || w[1] < w[0] || w[1] as usize > n_bytes {
            return Err(PyValueError::new_err(format!(
                "probe_images: offsets out of range ({}..{} in a buffer of {} bytes)",
                w[0], w[1], n_bytes
            )));
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
                        "null_image",
                        0,
                        0,
                        "",
                        0,
                        "image bytes are null".to_string(),
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
        })
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        flush(&mut blobs, &mut out);
        Ok(out)
    })
}

/// Decode one base64 payload (standard or URL-safe) to bytes; a ValueError on bad input.
#[pyfunction]
fn decode_base64(py: Python<'_>, text: &[u8]) -> PyResult<Py<pyo3::types::PyBytes>> {
    let out = header::decode_base64(text).map_err(|e| PyValueError::new_err(e.message()))?;
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
