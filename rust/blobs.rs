//! Reading the image window: the encoded bytes of the images a run of batches needs, fetched together so
//! that each parquet row group is streamed once (shard.rs) and each JSON file opened once (one `pread` per
//! image). Failures stay per image, so that `on_error="skip"` can drop only the samples they touch.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::index::{Encoding, IndexData, SourceKind};
use crate::pack::Batch;
use crate::shard;

/// image row -> its stored bytes (base64 text or raw), or why they could not be read.
pub type Blobs = HashMap<u32, Result<Vec<u8>>>;

/// The window starting at batch `start`: its end (exclusive) and its images (sorted, unique). The first
/// window of an epoch is one batch, so that the first batch comes without waiting for a full window; later
/// ones grow until `blob_window` images or `blob_window_mb` of stored bytes (a window of big photos must
/// not take gigabytes), always at least one batch.
pub fn next_window(
    ix: &IndexData,
    cfg: &Config,
    batches: &[Batch],
    start: usize,
) -> (usize, Vec<u32>) {
    let window = if start == 0 { 1 } else { cfg.blob_window };
    let max_bytes = cfg.blob_window_bytes();
    let mut end = start;
    let mut imgs: Vec<u32> = Vec::new();
    let mut bytes = 0usize;
    while end < batches.len() && (end == start || (imgs.len() < window && bytes < max_bytes)) {
        for &s in batches[end].iter().flatten() {
            for &img in ix.media(s as usize).flatten() {
                imgs.push(img);
                bytes = bytes.saturating_add(ix.img_bytes[img as usize] as usize);
            }
        }
        end += 1;
    }
    imgs.sort_unstable();
    imgs.dedup();
    (end, imgs)
}

/// Read the stored bytes of `images`, one pool task per (source, file, row group).
pub fn read_blobs(ix: &IndexData, images: &[u32], pool: &rayon::ThreadPool) -> Blobs {
    let mut groups: HashMap<(u32, u32, i64), Vec<u32>> = HashMap::new();
    for &img in images {
        let i = img as usize;
        groups
            .entry((ix.img_source[i], ix.img_file[i], ix.img_rg[i]))
            .or_default()
            .push(img);
    }
    // Each group holds at least the image that made it, so `first` below always exists.
    let groups: Vec<Vec<u32>> = groups.into_values().collect();
    let parts: Vec<Vec<(u32, Result<Vec<u8>>)>> = pool.install(|| {
        groups
            .par_iter()
            .filter_map(|imgs| {
                let first = *imgs.first()?;
                Some(match ix.source(first).kind {
                    SourceKind::Json => read_ranges(ix, first, imgs, true),
                    // A tar's base64 values sit inside JSON members (MMC4) and may hold escapes such as
                    // "\/"; raw members are image bytes, never unescaped.
                    SourceKind::Tar => read_ranges(ix, first, imgs, is_base64(ix, first)),
                    SourceKind::Parquet => read_parquet(ix, first, imgs),
                })
            })
            .collect()
    });
    parts.into_iter().flatten().collect()
}

/// Images of one row group of one parquet file (that of `first`), streamed in row order.
fn read_parquet(ix: &IndexData, first: u32, imgs: &[u32]) -> Vec<(u32, Result<Vec<u8>>)> {
    let path = ix.file(first);
    let src = ix.source(first);
    let column = src.image_column.as_deref().unwrap_or_default(); // IndexData::check: parquet has one
                                                                  // IndexData::check: parquet images have a row group and a row (>= 0)
    let row_group = ix.img_rg[first as usize] as usize;
    let mut imgs = imgs.to_vec();
    imgs.sort_by_key(|&img| ix.img_row[img as usize]);
    let rows: Vec<usize> = imgs
        .iter()
        .map(|&img| ix.img_row[img as usize] as usize)
        .collect();
    let mut out: Vec<(u32, Result<Vec<u8>>)> = Vec::with_capacity(imgs.len());
    // for_each_row visits exactly `rows`, in order: the k-th visit is the k-th image.
    let mut next = imgs.iter();
    let res = shard::for_each_row(path, column, row_group, &rows, |_row, value| {
        if let Some(&img) = next.next() {
            out.push((img, value.map(<[u8]>::to_vec).ok_or(Error::NullImage)));
        }
    });
    match res {
        Ok(()) => out,
        Err(e) => imgs.iter().map(|&img| (img, Err(e.clone()))).collect(),
    }
}

/// Images of one JSON file or tar shard (that of `first`), each by its byte range (one `pread` each);
/// `unescape`: the bytes are a JSON string's content (escapes undone).
fn read_ranges(
    ix: &IndexData,
    first: u32,
    imgs: &[u32],
    unescape: bool,
) -> Vec<(u32, Result<Vec<u8>>)> {
    let path = ix.file(first);
    let err = |cause: String| Error::File {
        file: path.to_string(),
        cause,
    };
    let opened = File::open(path)
        .and_then(|f| f.metadata().map(|m| (f, m.len())))
        .map_err(|e| err(format!("cannot open: {e}")));
    let (f, size) = match opened {
        Ok(x) => x,
        Err(e) => return imgs.iter().map(|&img| (img, Err(e.clone()))).collect(),
    };
    imgs.iter()
        .map(|&img| {
            // IndexData::check: JSON and tar images have a byte range (>= 0)
            let (off, len) = (
                ix.img_off[img as usize] as u64,
                ix.img_len[img as usize] as u64,
            );
            // A range past the end would only fail after allocating `len` bytes: refuse it first.
            if off.checked_add(len).is_none_or(|end| end > size) {
                return (
                    img,
                    Err(err(format!("bytes {off}+{len} beyond the file's {size}"))),
                );
            }
            let mut buf = vec![0u8; len as usize];
            let read = f
                .read_exact_at(&mut buf, off)
                .map(|_| if unescape { unescape_json(buf) } else { buf })
                .map_err(|e| err(e.to_string()));
            (img, read)
        })
        .collect()
}

/// JSON escapes inside a base64 string (e.g. "\/") undone; base64 itself never needs any.
fn unescape_json(buf: Vec<u8>) -> Vec<u8> {
    if !buf.contains(&b'\\') {
        return buf;
    }
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
    out
}

/// Whether an image's stored bytes are base64 text (decoded before the image decoder sees them).
pub fn is_base64(ix: &IndexData, img: u32) -> bool {
    ix.source(img).encoding == Encoding::Base64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_undone() {
        assert_eq!(unescape_json(b"ab\\/c\\nd".to_vec()), b"ab/cd".to_vec());
        assert_eq!(unescape_json(b"plain".to_vec()), b"plain".to_vec());
    }

    #[test]
    fn json_ranges_past_the_end_are_errors() {
        let dir = std::env::temp_dir().join(format!("otterfast-blobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("imgs.json");
        std::fs::write(&path, b"0123456789abcdefghijklmnopqrstuvwxyz").unwrap();
        let mut ix = crate::index::tests::tiny();
        ix.sources[0].files = vec![path.to_string_lossy().into_owned()];
        ix.img_off = vec![0, 10, i64::MAX];
        ix.img_len = vec![10, 100, 10];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let blobs = read_blobs(&ix, &[0, 1, 2], &pool);
        assert_eq!(blobs[&0].as_deref().unwrap(), b"0123456789");
        assert!(blobs[&1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("beyond the file's 36"));
        assert!(blobs[&2].is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tar_ranges_unescape_only_base64() {
        let dir = std::env::temp_dir().join(format!("otterfast-blobs-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shard.tar");
        std::fs::write(&path, b"raw\\/bytes|ab\\/cd").unwrap();
        let mut ix = crate::index::tests::tiny();
        ix.sources[0].kind = SourceKind::Tar;
        ix.sources[0].files = vec![path.to_string_lossy().into_owned()];
        ix.img_off = vec![0, 11, 0];
        ix.img_len = vec![10, 6, 1];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        ix.sources[0].encoding = Encoding::Raw;
        let blobs = read_blobs(&ix, &[0], &pool);
        assert_eq!(blobs[&0].as_deref().unwrap(), b"raw\\/bytes");
        ix.sources[0].encoding = Encoding::Base64;
        let blobs = read_blobs(&ix, &[1], &pool);
        assert_eq!(blobs[&1].as_deref().unwrap(), b"ab/cd");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
