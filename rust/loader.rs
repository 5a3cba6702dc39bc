//! Python bindings of the loader: `NativeLoader` (the engine in pipeline.rs), the batch planner
//! (pack.rs) and single-image decode/transform for tests. The index and the options cross as typed
//! structures (`IndexData` from data.native_index.NativeIndex, `Config` from data.batching.LoaderConfig); batches
//! cross as numpy arrays that own the Rust buffers (no copy); waiting for a batch releases the GIL.

use std::str::FromStr;
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config::Config;
use crate::error::Error;
use crate::index::IndexData;
use crate::layout::BatchOut;
use crate::pack;
use crate::pipeline::{self, Running};
use crate::pixel_cache::{self, PixelCache};
use crate::pixels::Pixels;

/// `from_py_with` for IndexData's arrays: a 1-D int32 or int64 numpy array (contiguous) as a Vec of `T`,
/// refusing values `T` cannot hold (a negative offset, row or size) instead of wrapping them.
pub(crate) fn ints<T: TryFrom<i64>>(ob: &Bound<'_, PyAny>) -> PyResult<Vec<T>> {
    fn convert<S: Copy + Into<i64>, T: TryFrom<i64>>(xs: &[S]) -> Result<Vec<T>, Error> {
        xs.iter()
            .map(|&x| {
                let v: i64 = x.into();
                T::try_from(v).map_err(|_| {
                    Error::Invalid(format!(
                        "value {v} out of range for {}",
                        std::any::type_name::<T>()
                    ))
                })
            })
            .collect()
    }
    if let Ok(a) = ob.cast::<PyArray1<i32>>() {
        return Ok(convert(a.readonly().as_slice()?)?);
    }
    if let Ok(a) = ob.cast::<PyArray1<i64>>() {
        return Ok(convert(a.readonly().as_slice()?)?);
    }
    Err(Error::Invalid(format!(
        "expected a 1-D int32 or int64 numpy array, got {}",
        ob.get_type().name()?
    ))
    .into())
}

/// `from_py_with` for option strings ("otter", "skip", "parquet", ...): parsed into their Rust enum.
pub(crate) fn parsed<T: FromStr<Err = Error>>(ob: &Bound<'_, PyAny>) -> PyResult<T> {
    Ok(ob.extract::<String>()?.parse::<T>()?)
}

#[pyclass(name = "NativeLoader", module = "otterfast._native")]
pub struct PyNativeLoader {
    index: Arc<IndexData>,
    cfg: Arc<Config>,
    // A Mutex only to make the class Sync for PyO3; every method takes &mut self, so it is never contended.
    running: std::sync::Mutex<Option<Running>>,
    pool: std::sync::Mutex<pipeline::Pool>,
    cache: Option<Arc<PixelCache>>,
}

#[pymethods]
impl PyNativeLoader {
    /// Built by otterfast.data.loader.NativeLoader (see that class) from a `NativeIndex` and the
    /// `LoaderConfig` (its capacity resolved). The whole index is checked here, without the GIL, so a
    /// bad index fails at construction with a ValueError naming the file and sample.
    #[new]
    fn new(py: Python<'_>, index: IndexData, config: Config) -> PyResult<Self> {
        config.check()?;
        let index = py.detach(move || index.check().map(|_| index))?;
        Ok(Self {
            index: Arc::new(index),
            cfg: Arc::new(config),
            running: std::sync::Mutex::new(None),
            pool: std::sync::Mutex::new(pipeline::Pool::default()),
            cache: None,
        })
    }

    /// Read Otter / CLIP squares from the pixel cache at `path` (data/pixel_cache.py checked that it was built
    /// for this index and this transform) instead of decoding them; `failed`: image rows it does not hold.
    fn attach_pixel_cache(
        &mut self,
        py: Python<'_>,
        path: String,
        failed: Vec<u32>,
    ) -> PyResult<()> {
        let slot = Pixels::of(&self.index, &self.cfg).square_bytes();
        let n = self.index.img_ids.len();
        let cache = py.detach(move || PixelCache::open(&path, slot, n, &failed))?;
        self.cache = Some(Arc::new(cache));
        Ok(())
    }

    /// Start producing `batches` (batches of rows of index sample rows) on a fresh thread and the loader's pool.
    /// A running epoch is stopped first.
    fn start(&mut self, py: Python<'_>, batches: Vec<Vec<Vec<u32>>>) -> PyResult<()> {
        let n = self.index.num_samples();
        if let Some(bad) = batches
            .iter()
            .flatten()
            .flatten()
            .find(|&&s| s as usize >= n)
        {
            return Err(
                Error::Invalid(format!("sample row {bad} out of range ({n} samples)")).into(),
            );
        }
        let slot = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        let old = slot.take();
        py.detach(move || drop(old));
        let pool = self
            .pool
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .get(self.cfg.threads())?;
        *slot = Some(pipeline::spawn(
            self.index.clone(),
            self.cfg.clone(),
            batches,
            self.cache.clone(),
            pool,
        )?);
        Ok(())
    }

    /// The next batch as a dict of numpy arrays, or None at the end of the epoch. Waits without the GIL.
    fn next_batch(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyDict>>> {
        let fuyu = self.index.fuyu;
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
            Ok(Err(e)) => {
                *slot = None;
                Err(e.into())
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
    py.detach(move || {
        let batches = pack::plan_batches(&lengths, &order, batch_size, pack, capacity, window)?;
        pack::shard_batches(batches, rank, world_size, even)
    })
    .map_err(PyErr::from)
}

/// Write the pixel cache of `index` (pixel_cache.rs) for transform `mode` ("otter" / "clip") at `size` to `path`
/// with `threads` threads (0: all cores), reading `window_mb` MiB of stored images at a time. Returns the image
/// rows that could not be cached: (row, error code, message).
#[pyfunction]
#[pyo3(signature = (index, path, mode, size=224, jpeg_draft=false, threads=0, window_mb=256))]
#[allow(clippy::too_many_arguments)]
fn build_pixel_cache(
    py: Python<'_>,
    index: IndexData,
    path: String,
    mode: String,
    size: u32,
    jpeg_draft: bool,
    threads: usize,
    window_mb: usize,
) -> PyResult<Vec<(u32, &'static str, String)>> {
    let pixels = Pixels::named(&mode, size, 1, 1)?;
    let failed = py.detach(move || {
        index.check()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("otterfast-cache-{i}"))
            .build()
            .map_err(|e| Error::Runtime(format!("cannot start threads: {e}")))?;
        pixel_cache::build(
            &index,
            pixels,
            jpeg_draft,
            std::path::Path::new(&path),
            &pool,
            window_mb.max(1) << 20,
        )
    })?;
    Ok(failed)
}

/// Decode + transform one encoded image: mode "otter" / "clip" -> (3, size, size) float32;
/// "fuyu" -> (rows * cols, 2700) float32 patches, with (rows, cols). Sizes refused as the loader refuses
/// them (limits.rs, `max_pixels` as the index's --max-image-pixels).
#[pyfunction]
#[pyo3(signature = (data, mode, is_base64=false, size=224, max_h=1080, max_w=1920, jpeg_draft=false,
                    max_pixels=crate::limits::DEFAULT_MAX_PIXELS))]
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
    max_pixels: u64,
) -> PyResult<(Py<PyAny>, usize, usize)> {
    let pixels = Pixels::named(&mode, size, max_h, max_w)?;
    let (v, r, c) = py.detach(move || pixels.render(&data, is_base64, jpeg_draft, max_pixels))?;
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
#[pyo3(signature = (data, draft=None, max_pixels=crate::limits::DEFAULT_MAX_PIXELS))]
fn decode_image(
    py: Python<'_>,
    data: Vec<u8>,
    draft: Option<u32>,
    max_pixels: u64,
) -> PyResult<Py<PyAny>> {
    let rgb = py.detach(move || match draft {
        Some(s) => crate::decode::decode_rgb_draft(&data, s, s, max_pixels),
        None => crate::decode::decode_rgb(&data, max_pixels),
    })?;
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
    m.add_function(wrap_pyfunction!(build_pixel_cache, m)?)?;
    Ok(())
}
