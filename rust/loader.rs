//! Python bindings of the loader: `NativeLoader` (the engine in pipeline.rs), the batch planner
//! (pack.rs) and a single-image transform for tests. Batches cross as numpy arrays that own the Rust
//! buffers (no copy); waiting for a batch releases the GIL.

use std::sync::Arc;

use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::pack;
use crate::pipeline::{self, BatchOut, Config, IndexData, Running, Source};

/// One named 1-D array of `arrays`, copied into a Vec (the index is read once per loader).
fn array<T: numpy::Element + Copy>(arrays: &Bound<'_, PyDict>, k: &str) -> PyResult<Vec<T>> {
    let a = arrays
        .get_item(k)?
        .ok_or_else(|| PyValueError::new_err(format!("missing array {k:?}")))?;
    let a: PyReadonlyArray1<'_, T> = a.extract()?;
    Ok(a.as_slice()?.to_vec())
}

#[pyclass(name = "NativeLoader", module = "otterfast._native")]
pub struct PyNativeLoader {
    index: Arc<IndexData>,
    cfg: Arc<Config>,
    // A Mutex only to make the class Sync for PyO3; every method takes &mut self, so it is never contended.
    running: std::sync::Mutex<Option<Running>>,
}

#[pymethods]
impl PyNativeLoader {
    /// Built by otterfast.data.loader.NativeLoader from a prepared index; see that class. `arrays` maps each
    /// IndexData field name to a 1-D int32/int64 numpy array (offsets are int64).
    #[new]
    fn new(
        arrays: &Bound<'_, PyDict>,
        datasets: Vec<String>,
        img_ids: Vec<String>,
        sources: Vec<(bool, Vec<String>, String, bool)>,
        options: &Bound<'_, PyDict>,
    ) -> PyResult<Self> {
        let i64s = |k: &str| array::<i64>(arrays, k);
        let i32s = |k: &str| array::<i32>(arrays, k);
        let offs = |k: &str| -> PyResult<Vec<usize>> {
            Ok(i64s(k)?.into_iter().map(|x| x as usize).collect())
        };
        let u32s = |k: &str| -> PyResult<Vec<u32>> {
            Ok(i32s(k)?.into_iter().map(|x| x as u32).collect())
        };
        let index = IndexData {
            tok_off: offs("tok_off")?,
            tokens: i32s("tokens")?,
            span_off: offs("span_off")?,
            spans: i32s("spans")?,
            mpos_off: offs("mpos_off")?,
            mpos: i32s("mpos")?,
            media_off: offs("media_off")?,
            media_img_off: offs("media_img_off")?,
            media_imgs: u32s("media_imgs")?,
            datasets,
            img_source: u32s("img_source")?,
            img_file: u32s("img_file")?,
            img_rg: u32s("img_rg")?,
            img_row: u32s("img_row")?,
            img_off: i64s("img_off")?,
            img_len: i64s("img_len")?,
            img_w: u32s("img_w")?,
            img_h: u32s("img_h")?,
            img_bytes: i64s("img_bytes")?
                .into_iter()
                .map(|x| x.max(0) as u64)
                .collect(),
            img_ids,
            sources: sources
                .into_iter()
                .map(|(json, files, column, base64)| Source {
                    json,
                    files,
                    column,
                    base64,
                })
                .collect(),
        };
        let n = index.datasets.len();
        for (name, v) in [
            ("tok_off", &index.tok_off),
            ("span_off", &index.span_off),
            ("mpos_off", &index.mpos_off),
            ("media_off", &index.media_off),
        ] {
            if v.len() != n + 1 {
                return Err(PyValueError::new_err(format!(
                    "{name}: expected {} offsets, got {}",
                    n + 1,
                    v.len()
                )));
            }
        }
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            options
                .get_item(k)?
                .ok_or_else(|| PyValueError::new_err(format!("missing option {k:?}")))
        };
        let cfg = Config {
            fuyu: get("fuyu")?.extract()?,
            pad_id: get("pad_id")?.extract()?,
            placeholder_id: get("placeholder_id")?.extract()?,
            newline_id: get("newline_id")?.extract()?,
            fuyu_max_h: get("fuyu_max_h")?.extract()?,
            fuyu_max_w: get("fuyu_max_w")?.extract()?,
            clip: get("clip")?.extract()?,
            image_size: get("image_size")?.extract()?,
            pack: get("pack")?.extract()?,
            capacity: get("capacity")?.extract()?,
            skip_errors: get("skip_errors")?.extract()?,
            num_threads: get("num_threads")?.extract()?,
            prefetch: get("prefetch")?.extract()?,
            blob_window: get("blob_window")?.extract()?,
            blob_window_bytes: get("blob_window_bytes")?.extract()?,
            jpeg_draft: get("jpeg_draft")?.extract()?,
        };
        Ok(Self {
            index: Arc::new(index),
            cfg: Arc::new(cfg),
            running: std::sync::Mutex::new(None),
        })
    }

    /// Start producing `batches` (batches of rows of index sample rows) on a fresh thread and pool.
    /// A running epoch is stopped first.
    fn start(&mut self, py: Python<'_>, batches: Vec<Vec<Vec<u32>>>) -> PyResult<()> {
        let n = self.index.datasets.len() as u32;
        if let Some(bad) = batches.iter().flatten().flatten().find(|&&s| s >= n) {
            return Err(PyValueError::new_err(format!(
                "sample row {bad} out of range ({n} samples)"
            )));
        }
        let slot = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        let old = slot.take();
        py.detach(move || drop(old));
        *slot = Some(pipeline::spawn(
            self.index.clone(),
            self.cfg.clone(),
            batches,
        ));
        Ok(())
    }

    /// The next batch as a dict of numpy arrays, or None at the end of the epoch. Waits without the GIL.
    fn next_batch(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyDict>>> {
        let fuyu = self.cfg.fuyu;
        let size = self.cfg.image_size as usize;
        let slot = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        let Some(running) = slot.as_mut() else {
            return Ok(None);
        };
        let Some(rx) = running.rx.take() else {
            return Ok(None);
        };
        let (rx, got) = py.detach(move || {
            let got = rx.recv();
            (rx, got)
        });
        running.rx = Some(rx);
        match got {
            Err(_) => {
                *slot = None; // the producer finished: end of epoch
                Ok(None)
            }
            Ok(Err(msg)) => {
                *slot = None;
                Err(PyValueError::new_err(msg))
            }
            Ok(Ok(b)) => Ok(Some(to_dict(py, b, fuyu, size)?)),
        }
    }

    /// Stop the running epoch, if any (joins the producer thread).
    fn stop(&mut self, py: Python<'_>) {
        let old = self
            .running
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        py.detach(move || drop(old));
    }
}

fn to_dict(py: Python<'_>, b: BatchOut, fuyu: bool, size: usize) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    let (r, c) = (b.rows, b.cols);
    d.set_item("input_ids", b.input_ids.into_pyarray(py).reshape([r, c])?)?;
    d.set_item("labels", b.labels.into_pyarray(py).reshape([r, c])?)?;
    d.set_item(
        "attention_mask",
        b.attention_mask.into_pyarray(py).reshape([r, c])?,
    )?;
    d.set_item(
        "position_ids",
        b.position_ids.into_pyarray(py).reshape([r, c])?,
    )?;
    d.set_item(
        "segment_ids",
        b.segment_ids.into_pyarray(py).reshape([r, c])?,
    )?;
    d.set_item("cu_seqlens", b.cu_seqlens.into_pyarray(py))?;
    d.set_item("sample_index", b.sample_index.into_pyarray(py))?;
    d.set_item("skipped", b.skipped)?;
    if fuyu {
        d.set_item(
            "image_patches",
            b.image_patches
                .into_pyarray(py)
                .reshape([b.n_patches, 2700])?,
        )?;
        d.set_item(
            "image_patches_indices",
            b.image_patches_indices.into_pyarray(py).reshape([r, c])?,
        )?;
    } else {
        d.set_item(
            "pixel_values",
            b.pixel_values
                .into_pyarray(py)
                .reshape([b.n_frames, 3, size, size])?,
        )?;
        d.set_item("media_row", b.media_row.into_pyarray(py))?;
        d.set_item("media_pos", b.media_pos.into_pyarray(py))?;
        d.set_item("media_frames", b.media_frames.into_pyarray(py))?;
    }
    Ok(d.unbind())
}

/// The epoch plan (pack.rs): (this rank's batches, batches dropped to keep ranks even).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (lengths, order, batch_size, pack, capacity, window, rank=0, world_size=1, even=true))]
fn plan_batches(
    py: Python<'_>,
    lengths: Vec<u32>,
    order: Vec<u32>,
    batch_size: usize,
    pack: bool,
    capacity: u32,
    window: usize,
    rank: usize,
    world_size: usize,
    even: bool,
) -> PyResult<(Vec<pack::Batch>, usize)> {
    if world_size == 0 || rank >= world_size {
        return Err(PyValueError::new_err(format!(
            "rank {rank} not in [0, {world_size})"
        )));
    }
    if let Some(&bad) = order.iter().find(|&&s| s as usize >= lengths.len()) {
        return Err(PyValueError::new_err(format!(
            "sample row {bad} out of range ({} samples)",
            lengths.len()
        )));
    }
    py.detach(move || {
        let batches = pack::plan_batches(&lengths, &order, batch_size, pack, capacity, window)
            .map_err(PyValueError::new_err)?;
        Ok(pack::shard_batches(batches, rank, world_size, even))
    })
}

/// Decode + transform one encoded image: mode "otter" / "clip" -> (3, size, size) float32;
/// "fuyu" -> (rows * cols, 2700) float32 patches, with (rows, cols).
#[pyfunction]
#[pyo3(signature = (data, mode, is_base64=false, size=224, max_h=1080, max_w=1920, jpeg_draft=false))]
#[allow(clippy::too_many_arguments)]
fn transform_image(
    py: Python<'_>,
    data: Vec<u8>,
    mode: String,
    is_base64: bool,
    size: u32,
    max_h: u32,
    max_w: u32,
    jpeg_draft: bool,
) -> PyResult<(Py<PyAny>, usize, usize)> {
    let (v, r, c) = py
        .detach(move || {
            pipeline::transform_one(&data, is_base64, &mode, size, max_h, max_w, jpeg_draft)
        })
        .map_err(PyValueError::new_err)?;
    let arr = if r > 0 {
        v.into_pyarray(py)
            .reshape([r * c, 2700])?
            .into_any()
            .unbind()
    } else {
        let s = size as usize;
        v.into_pyarray(py).reshape([3, s, s])?.into_any().unbind()
    };
    Ok((arr, r, c))
}

/// Decode one encoded image to RGB like PIL's convert("RGB"): (height, width, 3) uint8; with `draft`
/// (a size), JPEGs are decoded at reduced DCT scale like PIL after `img.draft("RGB", (draft, draft))`.
#[pyfunction]
#[pyo3(signature = (data, draft=None))]
fn decode_image(py: Python<'_>, data: Vec<u8>, draft: Option<u32>) -> PyResult<Py<PyAny>> {
    let rgb = py
        .detach(move || match draft {
            Some(s) => crate::decode::decode_rgb_draft(&data, s, s),
            None => crate::decode::decode_rgb(&data),
        })
        .map_err(PyValueError::new_err)?;
    let (h, w) = (rgb.height as usize, rgb.width as usize);
    Ok(rgb
        .data
        .into_pyarray(py)
        .reshape([h, w, 3])?
        .into_any()
        .unbind())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNativeLoader>()?;
    m.add_function(wrap_pyfunction!(plan_batches, m)?)?;
    m.add_function(wrap_pyfunction!(transform_image, m)?)?;
    m.add_function(wrap_pyfunction!(decode_image, m)?)?;
    Ok(())
}
