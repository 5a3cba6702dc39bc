//! The loader's engine: a producer thread that reads encoded images from the tables (a window of images
//! at a time, row group by row group), decodes and transforms them on its own rayon pool, assembles
//! model-ready batches and hands them over through a bounded queue. Knows nothing of Python or torch.
//!
//! The batch layout is the reference loader's (python/otterfast/data/reference.py), field for field.

use std::collections::HashMap;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::decode::decode_stored;
use crate::pack::Batch;
use crate::shard;
use crate::transform;

pub struct Source {
    pub json: bool,
    pub files: Vec<String>,
    pub column: String,
    pub base64: bool,
}

/// The prepared index, flattened (offset arrays delimit each sample's / media's slice).
pub struct IndexData {
    pub tok_off: Vec<usize>,
    pub tokens: Vec<i32>,
    pub span_off: Vec<usize>,
    pub spans: Vec<i32>,
    pub mpos_off: Vec<usize>,
    pub mpos: Vec<i32>,
    pub media_off: Vec<usize>,
    pub media_img_off: Vec<usize>,
    pub media_imgs: Vec<u32>,
    pub datasets: Vec<String>,
    pub img_source: Vec<u32>,
    pub img_file: Vec<u32>,
    pub img_rg: Vec<u32>,
    pub img_row: Vec<u32>,
    pub img_off: Vec<i64>,
    pub img_len: Vec<i64>,
    pub img_w: Vec<u32>,
    pub img_h: Vec<u32>,
    pub img_bytes: Vec<u64>, // encoded size, as stored (base64 included)
    pub img_ids: Vec<String>,
    pub sources: Vec<Source>,
}

impl IndexData {
    fn tokens(&self, s: usize) -> &[i32] {
        &self.tokens[self.tok_off[s]..self.tok_off[s + 1]]
    }
    fn spans(&self, s: usize) -> &[i32] {
        &self.spans[self.span_off[s]..self.span_off[s + 1]]
    }
    fn media_pos(&self, s: usize) -> &[i32] {
        &self.mpos[self.mpos_off[s]..self.mpos_off[s + 1]]
    }
    /// The images of each media of sample `s`.
    fn media(&self, s: usize) -> impl Iterator<Item = &[u32]> {
        (self.media_off[s]..self.media_off[s + 1])
            .map(move |m| &self.media_imgs[self.media_img_off[m]..self.media_img_off[m + 1]])
    }
}

#[derive(Clone)]
pub struct Config {
    pub fuyu: bool,
    pub pad_id: i64,
    pub placeholder_id: i64,
    pub newline_id: i64,
    pub fuyu_max_h: u32,
    pub fuyu_max_w: u32,
    pub clip: bool,
    pub image_size: u32,
    pub pack: bool,
    pub capacity: u32,
    pub skip_errors: bool,
    pub num_threads: usize,
    pub prefetch: usize,
    pub blob_window: usize,
    pub blob_window_bytes: usize,
    pub jpeg_draft: bool,
}

#[derive(Default)]
pub struct BatchOut {
    pub rows: usize,
    pub cols: usize,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub segment_ids: Vec<i32>,
    pub cu_seqlens: Vec<i32>,
    pub sample_index: Vec<i64>,
    pub pixel_values: Vec<f32>,
    pub n_frames: usize,
    pub media_row: Vec<i64>,
    pub media_pos: Vec<i64>,
    pub media_frames: Vec<i64>,
    pub image_patches: Vec<f32>,
    pub n_patches: usize,
    pub image_patches_indices: Vec<i64>,
    pub skipped: usize,
}

type Blobs = HashMap<u32, Result<Vec<u8>, String>>;

fn image_error(ix: &IndexData, img: u32, sample: Option<usize>, msg: &str) -> String {
    let i = img as usize;
    let src = &ix.sources[ix.img_source[i] as usize];
    let file = &src.files[ix.img_file[i] as usize];
    let ds = sample
        .map(|s| format!("dataset {}: ", ix.datasets[s]))
        .unwrap_or_default();
    format!(
        "{file}: {ds}image id '{}': cannot decode: {msg}",
        ix.img_ids[i]
    )
}

/// Read the encoded bytes of `images` (sorted, unique): each parquet row group once, JSON by byte range.
fn read_blobs(ix: &IndexData, images: &[u32], pool: &rayon::ThreadPool) -> Blobs {
    let mut groups: HashMap<(u32, u32, u32), Vec<u32>> = HashMap::new();
    for &img in images {
        let i = img as usize;
        groups
            .entry((ix.img_source[i], ix.img_file[i], ix.img_rg[i]))
            .or_default()
            .push(img);
    }
    let groups: Vec<_> = groups.into_iter().collect();
    let parts: Vec<Vec<(u32, Result<Vec<u8>, String>)>> = pool.install(|| {
        groups
            .par_iter()
            .map(|((source, file, rg), imgs)| {
                let src = &ix.sources[*source as usize];
                let path = &src.files[*file as usize];
                if src.json {
                    return match File::open(path) {
                        Ok(f) => imgs
                            .iter()
                            .map(|&img| (img, read_range(&f, path, ix, img)))
                            .collect(),
                        Err(e) => imgs
                            .iter()
                            .map(|&img| (img, Err(format!("{path}: {e}"))))
                            .collect(),
                    };
                }
                let mut imgs = imgs.clone();
                imgs.sort_by_key(|&img| ix.img_row[img as usize]);
                let rows: Vec<usize> = imgs
                    .iter()
                    .map(|&img| ix.img_row[img as usize] as usize)
                    .collect();
                let mut out: Vec<(u32, Result<Vec<u8>, String>)> = Vec::with_capacity(imgs.len());
                let mut k = 0usize;
                let res =
                    shard::for_each_row(path, &src.column, *rg as usize, &rows, |_row, value| {
                        let blob = value
                            .map(|v| v.to_vec())
                            .ok_or_else(|| "image bytes are null".to_string());
                        out.push((imgs[k], blob));
                        k += 1;
                    });
                if let Err(e) = res {
                    return imgs.iter().map(|&img| (img, Err(e.to_string()))).collect();
                }
                out
            })
            .collect()
    });
    parts.into_iter().flatten().collect()
}

fn read_range(f: &File, path: &str, ix: &IndexData, img: u32) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let (off, len) = (ix.img_off[img as usize], ix.img_len[img as usize]);
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off as u64)
        .map_err(|e| format!("{path}: {e}"))?;
    if buf.contains(&b'\\') {
        // JSON escapes inside a base64 string (e.g. "\/"): undo them; base64 never needs any.
        let mut out = Vec::with_capacity(buf.len());
        let mut it = buf.iter();
        while let Some(&b) = it.next() {
            if b == b'\\' {
                match it.next() {
                    Some(b'n') | Some(b'r') | Some(b't') => {}
                    Some(&c) => out.push(c),
                    None => {}
                }
            } else {
                out.push(b);
            }
        }
        return Ok(out);
    }
    Ok(buf)
}

/// Decode one image and write its pixels (Otter/CLIP: 3*S*S values; Fuyu: its patches) into `slot`.
fn decode_into(
    ix: &IndexData,
    cfg: &Config,
    img: u32,
    blob: &[u8],
    slot: &mut [f32],
) -> Result<(), String> {
    let src = &ix.sources[ix.img_source[img as usize] as usize];
    let draft = (cfg.jpeg_draft && !cfg.fuyu).then_some(cfg.image_size);
    let rgb = decode_stored(blob, src.base64, draft)?;
    if cfg.fuyu {
        transform::fuyu_patches_into(&rgb, cfg.fuyu_max_h, cfg.fuyu_max_w, slot).map(|_| ())
    } else if cfg.clip {
        transform::clip_pixels_into(&rgb, cfg.image_size, slot)
    } else {
        transform::otter_pixels_into(&rgb, cfg.image_size, slot)
    }
}

/// An image's Fuyu patch grid, from its header size (the decoded image must agree; decode_into checks).
fn fuyu_grid(ix: &IndexData, cfg: &Config, img: u32) -> (usize, usize) {
    let i = img as usize;
    transform::fuyu_grid(ix.img_h[i], ix.img_w[i], cfg.fuyu_max_h, cfg.fuyu_max_w)
}

/// Tokens, labels and media of a batch, with a slot (offset, length) in the pixel buffer for every image,
/// computed from the index alone (Fuyu grids come from the header sizes). `skip` holds samples left out.
fn layout(
    ix: &IndexData,
    cfg: &Config,
    batch: &Batch,
    skip: &[u32],
) -> Result<(BatchOut, Vec<(u32, usize, usize)>), String> {
    let per_frame = 3 * (cfg.image_size as usize).pow(2);
    let mut out = BatchOut {
        rows: batch.len(),
        ..Default::default()
    };
    // one sample's token stream (Fuyu: image tokens inserted where its media go)
    struct Seq {
        ids: Vec<i64>,
        labels: Vec<i64>,
        patch_idx: Vec<i64>,
    }
    let mut seqs: Vec<Vec<(u32, Seq)>> = Vec::with_capacity(batch.len());
    for row in batch {
        let mut kept = Vec::with_capacity(row.len());
        for &s in row {
            if skip.contains(&s) {
                out.skipped += 1;
                continue;
            }
            let su = s as usize;
            let toks = ix.tokens(su);
            let mut labels = vec![-100i64; toks.len()];
            for sp in ix.spans(su).chunks_exact(2) {
                for t in sp[0] as usize..sp[1] as usize {
                    labels[t] = toks[t] as i64;
                }
            }
            if !cfg.fuyu {
                kept.push((
                    s,
                    Seq {
                        ids: toks.iter().map(|&t| t as i64).collect(),
                        labels,
                        patch_idx: Vec::new(),
                    },
                ));
                continue;
            }
            let mpos = ix.media_pos(su);
            let media: Vec<&[u32]> = ix.media(su).collect();
            let mut q = Seq {
                ids: Vec::new(),
                labels: Vec::new(),
                patch_idx: Vec::new(),
            };
            let mut n_patches = 0usize;
            for t in 0..=toks.len() {
                for (m, &p) in mpos.iter().enumerate() {
                    if p as usize != t {
                        continue;
                    }
                    for &img in media[m] {
                        let (rows, cols) = fuyu_grid(ix, cfg, img);
                        for r in 0..rows {
                            for c in 0..cols {
                                q.ids.push(cfg.placeholder_id);
                                q.labels.push(-100);
                                q.patch_idx.push((n_patches + r * cols + c) as i64);
                            }
                            q.ids.push(cfg.newline_id);
                            q.labels.push(-100);
                            q.patch_idx.push(-1);
                        }
                        n_patches += rows * cols;
                    }
                }
                if t < toks.len() {
                    q.ids.push(toks[t] as i64);
                    q.labels.push(labels[t]);
                    q.patch_idx.push(-1);
                }
            }
            kept.push((s, q));
        }
        seqs.push(kept);
    }
    let width = if cfg.pack {
        cfg.capacity as usize
    } else {
        seqs.iter()
            .map(|r| r.iter().map(|(_, q)| q.ids.len()).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(1)
    };
    out.cols = width;
    let n = out.rows * width;
    out.input_ids = vec![cfg.pad_id; n];
    out.labels = vec![-100; n];
    out.attention_mask = vec![0; n];
    out.position_ids = vec![0; n];
    out.segment_ids = vec![-1; n];
    if cfg.fuyu {
        out.image_patches_indices = vec![-1; n];
    }
    out.cu_seqlens.push(0);
    let mut slots: Vec<(u32, usize, usize)> = Vec::new(); // (image row, offset, length) in the pixel buffer
    let mut cursor = 0usize;
    for (b, row) in seqs.into_iter().enumerate() {
        let mut off = 0usize;
        for (k, (s, q)) in row.into_iter().enumerate() {
            let len = q.ids.len();
            if off + len > width {
                return Err(format!("internal: row overflow ({} > {width})", off + len));
            }
            let base = b * width + off;
            out.input_ids[base..base + len].copy_from_slice(&q.ids);
            out.labels[base..base + len].copy_from_slice(&q.labels);
            for t in 0..len {
                out.attention_mask[base + t] = 1;
                out.position_ids[base + t] = t as i64;
                out.segment_ids[base + t] = k as i32;
            }
            out.cu_seqlens.push((base + len) as i32);
            out.sample_index.push(s as i64);
            let su = s as usize;
            if cfg.fuyu {
                for t in 0..len {
                    let p = q.patch_idx[t];
                    out.image_patches_indices[base + t] =
                        if p >= 0 { p + out.n_patches as i64 } else { -1 };
                }
                // patches in the order their tokens appear: media by position, frames in order
                let mpos = ix.media_pos(su);
                let media: Vec<&[u32]> = ix.media(su).collect();
                let mut order: Vec<usize> = (0..media.len()).collect();
                order.sort_by_key(|&m| (mpos[m], m));
                for m in order {
                    for &img in media[m] {
                        let (r, c) = fuyu_grid(ix, cfg, img);
                        let len = r * c * transform::PATCH_DIM;
                        slots.push((img, cursor, len));
                        cursor += len;
                        out.n_patches += r * c;
                    }
                }
            } else {
                for (p, media) in ix.media_pos(su).iter().zip(ix.media(su)) {
                    out.media_row.push(b as i64);
                    out.media_pos.push((off + *p as usize) as i64);
                    out.media_frames.push(media.len() as i64);
                    for &img in media {
                        slots.push((img, cursor, per_frame));
                        cursor += per_frame;
                        out.n_frames += 1;
                    }
                }
            }
            off += len;
        }
        if off < width {
            out.cu_seqlens.push(((b + 1) * width) as i32);
        }
    }
    Ok((out, slots))
}

fn build_batch(
    ix: &IndexData,
    cfg: &Config,
    batch: &Batch,
    blobs: &Blobs,
    pool: &rayon::ThreadPool,
) -> Result<BatchOut, String> {
    let mut skip: Vec<u32> = Vec::new();
    loop {
        let (mut out, slots) = layout(ix, cfg, batch, &skip)?;
        let total: usize = slots.iter().map(|s| s.2).sum();
        let mut buf = vec![0f32; total];
        // Decode every image straight into its slot of the batch buffer, in parallel: no copies.
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(slots.len());
        let mut rest: &mut [f32] = &mut buf;
        for &(_, _, len) in &slots {
            let (a, b) = rest.split_at_mut(len);
            parts.push(a);
            rest = b;
        }
        let failed: Vec<(u32, String)> = pool.install(|| {
            parts
                .into_par_iter()
                .zip(slots.par_iter())
                .filter_map(|(slot, &(img, _, _))| {
                    let r = match blobs.get(&img) {
                        Some(Ok(b)) => decode_into(ix, cfg, img, b, slot),
                        Some(Err(e)) => Err(e.clone()),
                        None => Err("internal: image bytes not read".to_string()),
                    };
                    r.err().map(|e| (img, e))
                })
                .collect()
        });
        if failed.is_empty() {
            if cfg.fuyu {
                out.image_patches = buf;
            } else {
                out.pixel_values = buf;
            }
            return Ok(out);
        }
        // The samples that use a failed image: an error, or (skip) left out and the batch laid out again.
        let bad: Vec<u32> = failed.iter().map(|f| f.0).collect();
        let culprits: Vec<u32> = batch
            .iter()
            .flatten()
            .copied()
            .filter(|&s| ix.media(s as usize).flatten().any(|i| bad.contains(i)))
            .collect();
        if !cfg.skip_errors {
            let (img, msg) = &failed[0];
            let s = culprits
                .iter()
                .copied()
                .find(|&s| ix.media(s as usize).flatten().any(|i| i == img));
            return Err(image_error(ix, *img, s.map(|s| s as usize), msg));
        }
        skip.extend(culprits);
    }
}

fn produce(
    ix: &IndexData,
    cfg: &Config,
    batches: Vec<Batch>,
    tx: &SyncSender<Result<BatchOut, String>>,
) {
    let threads = if cfg.num_threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        cfg.num_threads
    };
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(Err(format!("cannot start the loader's threads: {e}")));
            return;
        }
    };
    let mut start = 0usize;
    while start < batches.len() {
        // A window of batches whose images are read from the tables together (each row group once).
        let mut end = start;
        let mut imgs: Vec<u32> = Vec::new();
        // The first window is one batch, so that the first batch comes without waiting for a full window.
        let window = if start == 0 { 1 } else { cfg.blob_window };
        // Bounded by images and by stored bytes (a window of big photos must not take gigabytes).
        let mut bytes = 0usize;
        while end < batches.len()
            && (end == start || (imgs.len() < window && bytes < cfg.blob_window_bytes))
        {
            for &s in batches[end].iter().flatten() {
                for &img in ix.media(s as usize).flatten() {
                    imgs.push(img);
                    bytes += ix.img_bytes[img as usize] as usize;
                }
            }
            end += 1;
        }
        imgs.sort_unstable();
        imgs.dedup();
        let blobs = read_blobs(ix, &imgs, &pool);
        for batch in &batches[start..end] {
            let res = build_batch(ix, cfg, batch, &blobs, &pool);
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
    pub rx: Option<Receiver<Result<BatchOut, String>>>,
    pub handle: Option<JoinHandle<()>>,
}

pub fn spawn(ix: Arc<IndexData>, cfg: Arc<Config>, batches: Vec<Batch>) -> Running {
    let (tx, rx) = sync_channel(cfg.prefetch.max(1));
    let handle = std::thread::Builder::new()
        .name("otterfast-loader".into())
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| produce(&ix, &cfg, batches, &tx)));
            if r.is_err() {
                let _ = tx.send(Err("internal error: the loader thread panicked".into()));
            }
        })
        .expect("spawn loader thread");
    Running {
        rx: Some(rx),
        handle: Some(handle),
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.rx.take(); // the producer's next send fails and it exits
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// For tests and the CLI: decode + transform one encoded image.
pub fn transform_one(
    blob: &[u8],
    is_base64: bool,
    mode: &str,
    size: u32,
    max_h: u32,
    max_w: u32,
    draft: bool,
) -> Result<(Vec<f32>, usize, usize), String> {
    let rgb = decode_stored(blob, is_base64, (draft && mode != "fuyu").then_some(size))?;
    let mut out = Vec::new();
    match mode {
        "otter" => transform::otter_pixels(&rgb, size, &mut out).map(|_| (out, 0, 0)),
        "clip" => transform::clip_pixels(&rgb, size, &mut out).map(|_| (out, 0, 0)),
        "fuyu" => transform::fuyu_patches(&rgb, max_h, max_w, &mut out).map(|(r, c)| (out, r, c)),
        _ => Err(format!("unknown mode {mode:?}")),
    }
}
