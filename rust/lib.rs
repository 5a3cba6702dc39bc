//! `otterfast._native`: the bulk byte work of otterfast, bound to Python with PyO3.
//!
//! This file only binds; each stage lives in its own module. Every function releases the GIL around
//! its work and turns failures into Python exceptions or per-item error codes, never panics.

pub mod header;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::prelude::*;

/// One probed image: (error_code, width, height, format, encoded_len, message).
/// error_code is "" on success; then message is "".
type ProbeRow = (&'static str, u32, u32, &'static str, usize, String);

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
        return Err(PyValueError::new_err("probe_images: buffers must be C-contiguous"));
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
            .map(|w| {
                let blob = &bytes[w[0] as usize..w[1] as usize];
                match header::probe_blob(blob, is_base64) {
                    Ok(h) => ("", h.width, h.height, h.format, h.encoded_len, String::new()),
                    Err(e) => (e.code(), 0, 0, "", 0, e.message()),
                }
            })
            .collect::<Vec<ProbeRow>>()
    });
    drop(data);
    Ok(rows)
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
    Ok(())
}
