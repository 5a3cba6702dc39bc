//! Batch layout: tokens, labels, positions, segments, boundaries and media of a batch, and a slot in its
//! pixel buffer for every image, computed from the index alone (Fuyu grids from the header sizes), before
//! any pixel is decoded. Field for field the reference loader's layout (python/otterfast/data/reference.py).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::index::IndexData;
use crate::pack::Batch;
use crate::transform;

/// A model-ready batch: row-major (rows, cols) token arrays, flat pixel buffers with their shapes.
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
    /// Otter/CLIP: (n_frames, 3, size, size).
    pub pixel_values: Vec<f32>,
    pub n_frames: usize,
    pub media_row: Vec<i64>,
    pub media_pos: Vec<i64>,
    pub media_frames: Vec<i64>,
    /// Fuyu: (n_patches, 2700).
    pub image_patches: Vec<f32>,
    pub n_patches: usize,
    pub image_patches_indices: Vec<i64>,
    /// Samples left out because an image failed (on_error="skip").
    pub skipped: usize,
}

/// Where one image's pixels go in the batch's pixel buffer (consecutive: offsets are cumulative lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub img: u32,
    pub len: usize,
}

/// One sample's token stream (Fuyu: image tokens inserted where its media go).
struct Seq {
    sample: u32,
    ids: Vec<i64>,
    labels: Vec<i64>,
    /// Fuyu: the patch each token shows, within this sample; -1 for text and newlines.
    patch_idx: Vec<i64>,
}

fn sequence(ix: &IndexData, s: u32) -> Seq {
    let su = s as usize;
    let toks = ix.tokens(su);
    let mut labels = vec![-100i64; toks.len()];
    for (a, b) in ix.spans(su) {
        for t in a..b {
            labels[t] = toks[t] as i64;
        }
    }
    if !ix.fuyu {
        return Seq {
            sample: s,
            ids: toks.iter().map(|&t| t as i64).collect(),
            labels,
            patch_idx: Vec::new(),
        };
    }
    let mpos = ix.media_pos(su);
    let media: Vec<&[u32]> = ix.media(su).collect();
    let mut q = Seq {
        sample: s,
        ids: Vec::new(),
        labels: Vec::new(),
        patch_idx: Vec::new(),
    };
    let mut n_patches = 0usize;
    for t in 0..=toks.len() {
        // IndexData::check: one position per media, each within 0..=len(tokens)
        for (m, imgs) in media.iter().enumerate() {
            if mpos[m] != t {
                continue;
            }
            for &img in *imgs {
                let (rows, cols) = ix.fuyu_grid(img);
                for r in 0..rows {
                    for c in 0..cols {
                        q.ids.push(ix.placeholder_id);
                        q.labels.push(-100);
                        q.patch_idx.push((n_patches + r * cols + c) as i64);
                    }
                    q.ids.push(ix.newline_id);
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
    q
}

/// Lay out `batch` without the samples in `skip`: the batch's token arrays and media, and the slots of its
/// pixel buffer in the order the model reads them (Otter: media by position, Fuyu: patches by token).
pub fn layout(
    ix: &IndexData,
    cfg: &Config,
    batch: &Batch,
    skip: &[u32],
) -> Result<(BatchOut, Vec<Slot>)> {
    let per_frame = 3 * (cfg.image_size as usize).pow(2);
    let mut out = BatchOut {
        rows: batch.len(),
        ..Default::default()
    };
    let mut seqs: Vec<Vec<Seq>> = Vec::with_capacity(batch.len());
    for row in batch {
        let kept: Vec<Seq> = row
            .iter()
            .filter(|s| !skip.contains(s))
            .map(|&s| sequence(ix, s))
            .collect();
        out.skipped += row.len() - kept.len();
        seqs.push(kept);
    }
    let width = if cfg.pack {
        cfg.capacity as usize
    } else {
        seqs.iter()
            .map(|r| r.iter().map(|q| q.ids.len()).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(1)
    };
    out.cols = width;
    let n = out.rows * width;
    out.input_ids = vec![ix.pad_id; n];
    out.labels = vec![-100; n];
    out.attention_mask = vec![0; n];
    out.position_ids = vec![0; n];
    out.segment_ids = vec![-1; n];
    if ix.fuyu {
        out.image_patches_indices = vec![-1; n];
    }
    out.cu_seqlens.push(0);
    let mut slots: Vec<Slot> = Vec::new();
    for (b, row) in seqs.into_iter().enumerate() {
        let mut off = 0usize;
        for (k, q) in row.into_iter().enumerate() {
            let len = q.ids.len();
            if off + len > width {
                // The plan packs by the index's num_tokens, which IndexData::check proved equal to `len`;
                // only rows handed in by hand (collate_rows) can get here.
                return Err(Error::Invalid(format!(
                    "row {b} holds {} tokens, more than the packing capacity {width}",
                    off + len
                )));
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
            out.sample_index.push(q.sample as i64);
            let su = q.sample as usize;
            let mpos = ix.media_pos(su);
            if ix.fuyu {
                for (t, &p) in q.patch_idx.iter().enumerate() {
                    out.image_patches_indices[base + t] =
                        if p >= 0 { p + out.n_patches as i64 } else { -1 };
                }
                // patches in the order their tokens appear: media by position, frames in order
                let media: Vec<&[u32]> = ix.media(su).collect();
                let mut order: Vec<usize> = (0..media.len()).collect();
                order.sort_by_key(|&m| (mpos[m], m));
                for m in order {
                    for &img in media[m] {
                        let (r, c) = ix.fuyu_grid(img);
                        slots.push(Slot {
                            img,
                            len: r * c * transform::PATCH_DIM,
                        });
                        out.n_patches += r * c;
                    }
                }
            } else {
                for (&p, media) in mpos.iter().zip(ix.media(su)) {
                    out.media_row.push(b as i64);
                    out.media_pos.push((off + p) as i64);
                    out.media_frames.push(media.len() as i64);
                    for &img in media {
                        slots.push(Slot {
                            img,
                            len: per_frame,
                        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::tiny;

    #[test]
    fn packed_row_with_media_and_pad() {
        let ix = tiny();
        let cfg = Config::for_tests(); // capacity 16, image size 4
        let (out, slots) = layout(&ix, &cfg, &vec![vec![0, 1]], &[]).unwrap();
        assert_eq!((out.rows, out.cols), (1, 16));
        assert_eq!(&out.input_ids[..6], &[1, 2, 3, 4, 5, 0]);
        assert_eq!(&out.labels[..4], &[-100, 2, 3, -100]); // span 1..3 of sample 0
        assert_eq!(&out.position_ids[..6], &[0, 1, 2, 0, 1, 0]);
        assert_eq!(&out.segment_ids[..6], &[0, 0, 0, 1, 1, -1]);
        assert_eq!(out.cu_seqlens, vec![0, 3, 5, 16]);
        assert_eq!(
            (out.media_row, out.media_pos, out.media_frames),
            (vec![0], vec![0], vec![2])
        );
        assert_eq!(
            slots,
            vec![Slot { img: 0, len: 48 }, Slot { img: 1, len: 48 }]
        );
        let (out, slots) = layout(&ix, &cfg, &vec![vec![0, 1]], &[0]).unwrap();
        assert_eq!(
            (out.skipped, out.sample_index, slots.len()),
            (1, vec![1], 0)
        );
    }

    #[test]
    fn overfull_row_is_an_error() {
        let ix = tiny();
        let mut cfg = Config::for_tests();
        cfg.capacity = 4;
        assert!(layout(&ix, &cfg, &vec![vec![0, 1]], &[]).is_err());
    }
}
