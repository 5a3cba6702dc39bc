//! The pixel cache: every image of an index as the 8-bit `size x size` square that Otter's or CLIP's transform
//! makes before normalisation, one fixed-size slot per image row, written once (`otterfast data cache-pixels`,
//! data/pixel_cache.py) and read by the loader instead of reading, base64-decoding, decoding and resizing the
//! stored image. The loader normalises a cached square exactly as it normalises a fresh one, so batches are
//! bit-identical with and without the cache (tests/test_pixel_cache.py).
//!
//! An image that fails to decode is not cached: the loader reads and decodes it as before, so it fails or is
//! skipped exactly as without the cache. Slots are raw bytes at `img * slot`: one `pread` each, no format to
//! parse, no index (measured: ~0.1 ms per 224 px image from the page cache against ~4.6 ms to read, decode
//! and resize a 0.8 MP JPEG; benches/results/loader.md).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::blobs;
use crate::error::{catch_panic, Error, Result};
use crate::index::IndexData;
use crate::pixels::Pixels;

/// An open cache: its file, the bytes of one slot and which image rows it holds.
pub struct PixelCache {
    file: File,
    path: String,
    slot: usize,
    cached: Vec<bool>,
}

impl PixelCache {
    /// Open the cache at `path` for an index of `n_images` images whose squares are `slot` bytes; `failed` are
    /// the image rows the build could not cache (data/pixel_cache.py keeps them beside the file).
    pub fn open(path: &str, slot: usize, n_images: usize, failed: &[u32]) -> Result<Self> {
        let err = |cause: String| Error::File {
            file: path.to_string(),
            cause,
        };
        if slot == 0 {
            return Err(Error::Invalid(
                "a pixel cache needs Otter's or CLIP's square pixels".into(),
            ));
        }
        let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?
            .len();
        let want = (n_images as u64).checked_mul(slot as u64);
        if want != Some(len) {
            return Err(err(format!(
                "holds {len} bytes, not {n_images} images x {slot}: rebuild it (otterfast data cache-pixels)"
            )));
        }
        let mut cached = vec![true; n_images];
        for &img in failed {
            match cached.get_mut(img as usize) {
                Some(c) => *c = false,
                None => {
                    return Err(err(format!(
                        "failed image row {img} out of range ({n_images} images)"
                    )))
                }
            }
        }
        Ok(Self {
            file,
            path: path.to_string(),
            slot,
            cached,
        })
    }

    /// Whether image row `img` is in the cache.
    pub fn has(&self, img: u32) -> bool {
        self.cached.get(img as usize).copied().unwrap_or(false)
    }

    /// The cached square of image row `img` (`has(img)` is true). A failed read is the cache's fault, not the
    /// image's: a Runtime error, which ends the epoch and is never skipped (a skip would drop a sample the tables
    /// hold intact).
    pub fn read(&self, img: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.slot];
        self.file
            .read_exact_at(&mut buf, img as u64 * self.slot as u64)
            .map_err(|e| {
                Error::Runtime(format!(
                    "{}: cannot read the pixel cache's image row {img}: {e}; rebuild it (otterfast data \
                     cache-pixels) or set pixel_cache: never",
                    self.path
                ))
            })?;
        Ok(buf)
    }
}

/// Write the cache of every image of `ix` to `path` (through a `.partial` file of this build's own, fsynced,
/// then renamed, so that a cache on disk is always whole and two builds never write into one file; removed
/// when the build fails), reading each table's images in storage order, `window_bytes` of stored
/// bytes at a time, decoding on `pool`. Returns the images that could not be cached: (row, error code, message
/// naming its file and id).
pub fn build(
    ix: &IndexData,
    pixels: Pixels,
    jpeg_draft: bool,
    path: &Path,
    pool: &rayon::ThreadPool,
    window_bytes: usize,
) -> Result<Vec<(u32, &'static str, String)>> {
    let slot = pixels.square_bytes();
    if slot == 0 {
        return Err(Error::Invalid(
            "a pixel cache holds Otter's or CLIP's square pixels; a Fuyu index has none".into(),
        ));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let partial = path.with_extension(format!("partial-{}-{nanos}", std::process::id()));
    let r = write_partial(ix, pixels, jpeg_draft, path, &partial, pool, window_bytes);
    if r.is_err() {
        let _ = std::fs::remove_file(&partial); // a failed build leaves nothing as large as the cache behind
    }
    r
}

fn file_err(p: &Path, cause: String) -> Error {
    Error::File {
        file: p.display().to_string(),
        cause,
    }
}

fn write_partial(
    ix: &IndexData,
    pixels: Pixels,
    jpeg_draft: bool,
    path: &Path,
    partial: &Path,
    pool: &rayon::ThreadPool,
    window_bytes: usize,
) -> Result<Vec<(u32, &'static str, String)>> {
    let slot = pixels.square_bytes();
    let n = ix.img_ids.len();
    let out = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(partial)
        .map_err(|e| file_err(partial, format!("cannot create: {e}")))?;
    out.set_len(n as u64 * slot as u64)
        .map_err(|e| file_err(partial, format!("cannot size: {e}")))?;

    // Storage order: each row group (or JSON / tar file) is streamed once per window, front to back.
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&i| {
        let i = i as usize;
        (
            ix.img_source[i],
            ix.img_file[i],
            ix.img_rg[i],
            ix.img_row[i],
            ix.img_off[i],
        )
    });
    let mut failed: Vec<(u32, &'static str, String)> = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        let mut bytes = 0usize;
        while end < order.len() && (end == start || bytes < window_bytes) {
            bytes = bytes.saturating_add(ix.img_bytes[order[end] as usize] as usize);
            end += 1;
        }
        let window = &order[start..end];
        let stored = blobs::read_blobs(ix, window, pool);
        let results: BTreeMap<u32, Result<()>> = pool.install(|| {
            window
                .par_iter()
                .map(|&img| {
                    let square = match stored.get(&img) {
                        Some(Ok(b)) => catch_panic(
                            || {
                                pixels.square(
                                    b,
                                    blobs::is_base64(ix, img),
                                    jpeg_draft,
                                    ix.max_image_pixels,
                                )
                            },
                            |m| Error::BadPixels(format!("decoding this image panicked: {m}")),
                        ),
                        Some(Err(e)) => Err(e.clone()),
                        None => Err(Error::Runtime(format!(
                            "internal: the bytes of image row {img} were not read"
                        ))),
                    };
                    let r = square.and_then(|sq| {
                        out.write_all_at(&sq.data, img as u64 * slot as u64)
                            .map_err(|e| file_err(partial, format!("cannot write: {e}")))
                    });
                    (img, r)
                })
                .collect()
        });
        for (img, r) in results {
            match r {
                Ok(()) => {}
                // A write that failed, or our own bug: the cache cannot be trusted, stop.
                Err(e @ (Error::Runtime(_) | Error::File { .. }))
                    if !matches!(stored.get(&img), Some(Err(_))) =>
                {
                    return Err(e)
                }
                Err(e) => {
                    let code = e.code();
                    let named = e.at_image(ix.file(img), None, &ix.img_ids[img as usize]);
                    failed.push((img, code, named.to_string()));
                }
            }
        }
        start = end;
    }
    out.sync_all()
        .map_err(|e| file_err(partial, format!("cannot sync: {e}")))?;
    drop(out);
    std::fs::rename(partial, path).map_err(|e| file_err(path, format!("cannot rename: {e}")))?;
    if let Some(dir) = path.parent() {
        // The rename itself survives a power loss only once its folder is synced.
        let d = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| file_err(d, format!("cannot sync the folder: {e}")))?;
    }
    Ok(failed)
}
