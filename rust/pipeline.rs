//! Threads and queue: a producer thread per epoch, working on the loader's rayon pool, reads a window of images
//! (blobs.rs), lays out each batch (layout.rs), decodes every image straight into its slot of the batch's
//! pixel buffer in parallel (pixels.rs) and hands batches over through a bounded queue. Knows nothing of
//! Python; loader.rs binds it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::blobs::{self, Blobs};
use crate::config::{Config, OnError};
use crate::error::{catch_panic, panic_message, Error, Result};
use crate::index::IndexData;
use crate::layout::{layout, BatchOut};
use crate::pack::Batch;
use crate::pixel_cache::PixelCache;
use crate::pixels::Pixels;

/// Lay out `batch` and decode its images. An image that fails either ends the epoch with an error naming
/// file, dataset and image id, or (on_error="skip") drops every sample using it and lays the batch out again.
fn build_batch(
    ix: &IndexData,
    cfg: &Config,
    batch: &Batch,
    blobs: &Blobs,
    cache: Option<&PixelCache>,
    pool: &rayon::ThreadPool,
) -> Result<BatchOut> {
    let pixels = Pixels::of(ix, cfg);
    let mut skip: Vec<u32> = Vec::new();
    loop {
        let (mut out, slots) = layout(ix, cfg, batch, &skip)?;
        let mut buf = vec![0f32; slots.iter().map(|s| s.len).sum()];
        // Decode every image straight into its slot of the batch buffer, in parallel: no copies.
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(slots.len());
        let mut rest: &mut [f32] = &mut buf;
        for slot in &slots {
            let (a, b) = rest.split_at_mut(slot.len);
            parts.push(a);
            rest = b;
        }
        let failed: Vec<(u32, Error)> = pool.install(|| {
            parts
                .into_par_iter()
                .zip(slots.par_iter())
                .filter_map(|(part, slot)| {
                    let img = slot.img;
                    let r = match blobs.get(&img) {
                        // Not read: it is in the pixel cache (produce); the same u8 square, normalised alike.
                        None if cache.is_some_and(|c| c.has(img)) => cache
                            .map(|c| c.read(img))
                            .unwrap_or_else(|| Err(Error::Runtime("internal: no cache".into())))
                            .and_then(|sq| pixels.normalise(&sq, part)),
                        // A panic in decoding or transforming is this image's failure (named, skippable),
                        // not the epoch's.
                        Some(Ok(b)) => catch_panic(
                            || {
                                pixels.write(
                                    b,
                                    blobs::is_base64(ix, img),
                                    cfg.jpeg_draft,
                                    ix.max_image_pixels,
                                    part,
                                )
                            },
                            |m| Error::BadPixels(format!("decoding this image panicked: {m}")),
                        ),
                        Some(Err(e)) => Err(e.clone()),
                        None => Err(Error::Runtime(format!(
                            "internal: the bytes of image row {img} were not read"
                        ))),
                    };
                    r.err().map(|e| (img, e))
                })
                .collect()
        });
        let Some((img, cause)) = failed.first() else {
            if ix.fuyu {
                out.image_patches = buf;
            } else {
                out.pixel_values = buf;
            }
            return Ok(out);
        };
        if let Some((_, e)) = failed.iter().find(|(_, e)| matches!(e, Error::Runtime(_))) {
            return Err(e.clone()); // ours or the pixel cache's fault, not an image's: never skipped
        }
        let bad: Vec<u32> = failed.iter().map(|f| f.0).collect();
        let uses = |s: u32, imgs: &[u32]| ix.media(s as usize).flatten().any(|i| imgs.contains(i));
        if cfg.on_error == OnError::Raise {
            let dataset = batch
                .iter()
                .flatten()
                .find(|&&s| uses(s, &[*img]))
                .map(|&s| ix.datasets[s as usize].as_str());
            return Err(cause
                .clone()
                .at_image(ix.file(*img), dataset, &ix.img_ids[*img as usize]));
        }
        skip.extend(batch.iter().flatten().copied().filter(|&s| uses(s, &bad)));
    }
}

type Queue = SyncSender<Result<BatchOut>>;

fn produce(
    ix: &IndexData,
    cfg: &Config,
    batches: Vec<Batch>,
    tx: &Queue,
    cache: Option<&PixelCache>,
    pool: &rayon::ThreadPool,
) {
    let mut start = 0usize;
    while start < batches.len() {
        let (end, mut imgs) = blobs::next_window(ix, cfg, &batches, start);
        if let Some(c) = cache {
            imgs.retain(|&img| !c.has(img)); // their squares come from the cache, not the tables
        }
        let blobs = blobs::read_blobs(ix, &imgs, pool);
        for batch in &batches[start..end] {
            let res = build_batch(ix, cfg, batch, &blobs, cache, pool);
            let failed = res.is_err();
            if tx.send(res).is_err() || failed {
                return; // the consumer went away, or we reported an error and stop
            }
        }
        start = end;
    }
}

/// A running epoch: the producer thread and the receiving end of its queue.
pub struct Running {
    pub rx: Option<Receiver<Result<BatchOut>>>,
    handle: Option<JoinHandle<()>>,
}

/// The loader's decode threads: built at its first epoch (never when a loader is built, so that a process forked
/// before iterating starts its own) and kept for its later epochs. A fresh pool every epoch made glibc hand each
/// generation of threads its own arenas, which kept the freed image buffers fragmented: the soak's RSS crept
/// ~5 MiB an epoch (benches/soak.py: +6.7 % over 20 epochs; MALLOC_ARENA_MAX=2 made it flat, which pinned it down).
#[derive(Default)]
pub struct Pool {
    built: Option<(u32, Arc<rayon::ThreadPool>)>,
}

impl Pool {
    /// This process's pool of `threads` threads. In a child forked after the parent iterated, the inherited pool
    /// names threads that do not exist there (and may hold locks taken by them): it is leaked, never touched.
    pub fn get(&mut self, threads: usize) -> Result<Arc<rayon::ThreadPool>> {
        let pid = std::process::id();
        match self.built.take() {
            Some((owner, pool)) if owner == pid => {
                self.built = Some((owner, pool.clone()));
                return Ok(pool);
            }
            Some(inherited) => std::mem::forget(inherited),
            None => {}
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("otterfast-decode-{i}"))
            .build()
            .map_err(|e| Error::Runtime(format!("cannot start the loader's threads: {e}")))?;
        let pool = Arc::new(pool);
        self.built = Some((pid, pool.clone()));
        Ok(pool)
    }
}

/// Start producing `batches` (IndexData::check passed; sample rows in range) on a fresh thread, decoding on `pool`.
pub fn spawn(
    ix: Arc<IndexData>,
    cfg: Arc<Config>,
    batches: Vec<Batch>,
    cache: Option<Arc<PixelCache>>,
    pool: Arc<rayon::ThreadPool>,
) -> Result<Running> {
    let (tx, rx) = sync_channel(cfg.prefetch.max(1));
    let handle = std::thread::Builder::new()
        .name("otterfast-loader".into())
        .spawn(move || {
            // Data-dependent steps catch their own panics (per image, per row group); one reaching here is
            // a bug in this crate, reported with its message rather than as a dead queue.
            let r = catch_unwind(AssertUnwindSafe(|| {
                produce(&ix, &cfg, batches, &tx, cache.as_deref(), &pool)
            }));
            if let Err(payload) = r {
                let _ = tx.send(Err(Error::Runtime(format!(
                    "internal error: the loader thread panicked: {}",
                    panic_message(payload.as_ref())
                ))));
            }
        })
        .map_err(|e| Error::Runtime(format!("cannot start the loader thread: {e}")))?;
    Ok(Running {
        rx: Some(rx),
        handle: Some(handle),
    })
}

impl Drop for Running {
    fn drop(&mut self) {
        self.rx.take(); // the producer's next send fails and it exits
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
