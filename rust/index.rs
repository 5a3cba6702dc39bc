//! The prepared index as the engine holds it: flat arrays, offset arrays delimiting each sample's (and each
//! media's) slice, the image table, and the facts of the index's format and tokenizer.
//!
//! It crosses from Python in one piece: `IndexData` is extracted attribute by attribute from the dataclass
//! `otterfast.data.native_index.NativeIndex` (same field names), the image sources from `data.sources.ImageSource`.
//! `check` then proves every offset and every image reference in range, once, so that the engine can
//! index its slices without a bounds failure whatever the files on disk say.

use pyo3::FromPyObject;

use crate::error::{Error, Result};
use crate::transform;

/// Where an image table's bytes are and how they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Parquet,
    Json,
    /// Webdataset tar shards (data/shards.py): each image is a byte range of the tar file (a whole member,
    /// or the base64 value inside an MMC4 document's JSON member).
    Tar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base64,
    Raw,
}

crate::option_from_str!(SourceKind, "image source kind", "parquet" => SourceKind::Parquet, "json" => SourceKind::Json, "tar" => SourceKind::Tar);

crate::option_from_str!(Encoding, "image encoding", "base64" => Encoding::Base64, "raw" => Encoding::Raw);

/// One image source (data.sources.ImageSource): its files and, for parquet, the image column.
#[derive(Debug, Clone, FromPyObject)]
pub struct Source {
    #[pyo3(from_py_with = crate::loader::parsed)]
    pub kind: SourceKind,
    pub files: Vec<String>,
    #[pyo3(from_py_with = crate::loader::parsed)]
    pub encoding: Encoding,
    pub image_column: Option<String>,
}

/// The prepared index, flattened (field for field the dataclass data.native_index.NativeIndex).
#[derive(Debug, Clone, FromPyObject)]
pub struct IndexData {
    /// The index folder, for error messages.
    pub path: String,
    // The format and its tokenizer.
    pub fuyu: bool,
    pub pad_id: i64,
    pub placeholder_id: i64,
    pub newline_id: i64,
    pub fuyu_max_h: u32,
    pub fuyu_max_w: u32,
    /// prepare's --max-image-pixels: the loader refuses the same image sizes (limits.rs).
    pub max_image_pixels: u64,
    // Per sample (samples.arrow).
    pub sample_ids: Vec<String>,
    pub datasets: Vec<String>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub num_tokens: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub tok_off: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub tokens: Vec<i32>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub span_off: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub spans: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub mpos_off: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub mpos: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub media_off: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub media_img_off: Vec<usize>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub media_imgs: Vec<u32>,
    // Per image (images.arrow).
    pub img_ids: Vec<String>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_source: Vec<u32>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_file: Vec<u32>,
    // Where the bytes are: parquet (row group, row), JSON (byte offset, length); -1 where not used.
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_rg: Vec<i64>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_row: Vec<i64>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_off: Vec<i64>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_len: Vec<i64>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_w: Vec<u32>,
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_h: Vec<u32>,
    /// Encoded size as stored (base64 included), for the byte-bounded read window.
    #[pyo3(from_py_with = crate::loader::ints)]
    pub img_bytes: Vec<u64>,
    pub sources: Vec<Source>,
}

impl IndexData {
    pub fn num_samples(&self) -> usize {
        self.sample_ids.len()
    }
    pub fn tokens(&self, s: usize) -> &[i32] {
        &self.tokens[self.tok_off[s]..self.tok_off[s + 1]]
    }
    /// Label spans of sample `s` as (start, end) token ranges.
    pub fn spans(&self, s: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.spans[self.span_off[s]..self.span_off[s + 1]]
            .chunks_exact(2)
            .map(|p| (p[0], p[1]))
    }
    pub fn media_pos(&self, s: usize) -> &[usize] {
        &self.mpos[self.mpos_off[s]..self.mpos_off[s + 1]]
    }
    /// The images of each media of sample `s`.
    pub fn media(&self, s: usize) -> impl Iterator<Item = &[u32]> {
        (self.media_off[s]..self.media_off[s + 1])
            .map(move |m| &self.media_imgs[self.media_img_off[m]..self.media_img_off[m + 1]])
    }
    pub fn source(&self, img: u32) -> &Source {
        &self.sources[self.img_source[img as usize] as usize]
    }
    pub fn file(&self, img: u32) -> &str {
        let i = img as usize;
        &self.sources[self.img_source[i] as usize].files[self.img_file[i] as usize]
    }
    /// An image's Fuyu patch grid, from its header size (the decoded image must agree; pixels.rs checks).
    pub fn fuyu_grid(&self, img: u32) -> (usize, usize) {
        let i = img as usize;
        transform::fuyu_grid(
            self.img_h[i],
            self.img_w[i],
            self.fuyu_max_h,
            self.fuyu_max_w,
        )
    }
    /// Tokens sample `s` takes in a row: its text plus, for Fuyu, a placeholder per patch and a newline
    /// per patch row of every image (data/images.py fuyu_num_tokens).
    fn laid_out_len(&self, s: usize) -> usize {
        let mut n = self.tokens(s).len();
        if self.fuyu {
            for &img in self.media(s).flatten() {
                let (r, c) = self.fuyu_grid(img);
                n += r * c + r;
            }
        }
        n
    }

    /// Prove the index consistent before any batch: array lengths, offsets, label spans, media positions,
    /// every image reference within the image table, every image within its source's files, and each
    /// sample's token count (the plan's input) equal to what the layout will make of it.
    pub fn check(&self) -> Result<()> {
        let samples = format!("{}/samples.arrow", self.path);
        let images = format!("{}/images.arrow", self.path);
        let whole = |file: &str, cause: String| Error::Index {
            file: file.to_string(),
            sample: None,
            cause,
        };
        let n = self.num_samples();
        if self.datasets.len() != n || self.num_tokens.len() != n {
            return Err(whole(
                &samples,
                format!(
                    "{n} sample ids, {} datasets, {} token counts",
                    self.datasets.len(),
                    self.num_tokens.len()
                ),
            ));
        }
        // Each offset array: n + 1 entries, from 0, never decreasing, ending at its values' length.
        for (name, offs, values) in [
            ("input_ids", &self.tok_off, self.tokens.len()),
            ("label_spans", &self.span_off, self.spans.len()),
            ("media_pos", &self.mpos_off, self.mpos.len()),
            (
                "media_images",
                &self.media_off,
                self.media_img_off.len().saturating_sub(1),
            ),
        ] {
            check_offsets(offs, n, values).map_err(|c| whole(&samples, format!("{name}: {c}")))?;
        }
        let n_media = self.media_img_off.len().saturating_sub(1);
        check_offsets(&self.media_img_off, n_media, self.media_imgs.len())
            .map_err(|c| whole(&samples, format!("media_images (frames): {c}")))?;

        let m = self.img_ids.len();
        for (name, len) in [
            ("source", self.img_source.len()),
            ("file", self.img_file.len()),
            ("row_group", self.img_rg.len()),
            ("row", self.img_row.len()),
            ("byte_offset", self.img_off.len()),
            ("byte_length", self.img_len.len()),
            ("width", self.img_w.len()),
            ("height", self.img_h.len()),
            ("stored bytes", self.img_bytes.len()),
        ] {
            if len != m {
                return Err(whole(
                    &images,
                    format!("{m} image ids but {len} values of {name}"),
                ));
            }
        }
        for (k, src) in self.sources.iter().enumerate() {
            if src.kind == SourceKind::Parquet && src.image_column.is_none() {
                return Err(whole(
                    &format!("{}/meta.json", self.path),
                    format!("image source {k} is a parquet table without an image column"),
                ));
            }
        }
        for i in 0..m {
            let at = |cause: String| {
                whole(
                    &images,
                    format!("image id '{}' (row {i}): {cause}", self.img_ids[i]),
                )
            };
            let src = self.img_source[i] as usize;
            let Some(source) = self.sources.get(src) else {
                return Err(at(format!(
                    "source {src} out of range ({} sources)",
                    self.sources.len()
                )));
            };
            let file = self.img_file[i] as usize;
            if file >= source.files.len() {
                return Err(at(format!(
                    "file {file} out of range (its source has {} files)",
                    source.files.len()
                )));
            }
            let (what, a, b) = match source.kind {
                SourceKind::Parquet => ("row group and row", self.img_rg[i], self.img_row[i]),
                SourceKind::Json | SourceKind::Tar => {
                    ("byte range", self.img_off[i], self.img_len[i])
                }
            };
            if a < 0 || b < 0 {
                return Err(at(format!("{what} ({a}, {b}) out of range")));
            }
        }

        for s in 0..n {
            let at = |cause: String| Error::Index {
                file: samples.clone(),
                sample: Some((s, self.sample_ids[s].clone())),
                cause,
            };
            let n_tok = self.tokens(s).len();
            let spans = &self.spans[self.span_off[s]..self.span_off[s + 1]];
            if !spans.len().is_multiple_of(2) {
                return Err(at(format!("{} label span bounds (not pairs)", spans.len())));
            }
            if let Some((a, b)) = self.spans(s).find(|&(a, b)| a > b || b > n_tok) {
                return Err(at(format!(
                    "label span {a}..{b} outside its {n_tok} tokens"
                )));
            }
            let n_media = self.media_off[s + 1] - self.media_off[s];
            let pos = self.media_pos(s);
            if pos.len() != n_media {
                return Err(at(format!(
                    "{} media positions for {n_media} media",
                    pos.len()
                )));
            }
            if let Some(p) = pos.iter().find(|&&p| p > n_tok) {
                return Err(at(format!("media position {p} beyond its {n_tok} tokens")));
            }
            if let Some(img) = self.media(s).flatten().find(|&&i| i as usize >= m) {
                return Err(at(format!(
                    "image row {img} out of range (the image table {images} holds {m} images)"
                )));
            }
            let len = self.laid_out_len(s);
            if len != self.num_tokens[s] {
                return Err(at(format!(
                    "num_tokens is {} but its tokens and images make {len}",
                    self.num_tokens[s]
                )));
            }
        }
        Ok(())
    }
}

fn check_offsets(offs: &[usize], n: usize, values: usize) -> std::result::Result<(), String> {
    if offs.len() != n + 1 {
        return Err(format!("expected {} offsets, got {}", n + 1, offs.len()));
    }
    if offs[0] != 0 || offs[n] != values || offs.windows(2).any(|w| w[1] < w[0]) {
        return Err(format!(
            "offsets do not delimit the {values} values (first {}, last {})",
            offs[0], offs[n]
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two samples over three JSON images: sample 0 has one media of images [0, 1], sample 1 none.
    pub(crate) fn tiny() -> IndexData {
        IndexData {
            path: "IDX".into(),
            fuyu: false,
            pad_id: 0,
            placeholder_id: -1,
            newline_id: -1,
            fuyu_max_h: 1080,
            fuyu_max_w: 1920,
            max_image_pixels: crate::limits::DEFAULT_MAX_PIXELS,
            sample_ids: vec!["a".into(), "b".into()],
            datasets: vec!["D".into(), "D".into()],
            num_tokens: vec![3, 2],
            tok_off: vec![0, 3, 5],
            tokens: vec![1, 2, 3, 4, 5],
            span_off: vec![0, 2, 2],
            spans: vec![1, 3],
            mpos_off: vec![0, 1, 1],
            mpos: vec![0],
            media_off: vec![0, 1, 1],
            media_img_off: vec![0, 2],
            media_imgs: vec![0, 1],
            img_ids: vec!["x".into(), "y".into(), "z".into()],
            img_source: vec![0; 3],
            img_file: vec![0; 3],
            img_rg: vec![-1; 3],
            img_row: vec![-1; 3],
            img_off: vec![0, 10, 20],
            img_len: vec![10; 3],
            img_w: vec![30; 3],
            img_h: vec![30; 3],
            img_bytes: vec![10; 3],
            sources: vec![Source {
                kind: SourceKind::Json,
                files: vec!["imgs.json".into()],
                encoding: Encoding::Base64,
                image_column: None,
            }],
        }
    }

    #[test]
    fn a_consistent_index_passes() {
        tiny().check().unwrap();
    }

    #[test]
    fn image_reference_out_of_range_names_the_sample() {
        let mut ix = tiny();
        ix.media_imgs[1] = 7;
        let e = ix.check().unwrap_err().to_string();
        assert!(
            e.starts_with("IDX/samples.arrow: sample 'a' (row 0): image row 7 out of range"),
            "{e}"
        );
    }

    #[test]
    fn every_inconsistency_is_an_error_not_a_panic() {
        type Spoil = Box<dyn Fn(&mut IndexData)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("offsets", Box::new(|ix| ix.tok_off = vec![0, 9, 5])),
            ("offsets", Box::new(|ix| ix.tok_off = vec![0, 3])),
            ("label span", Box::new(|ix| ix.spans = vec![2, 9])),
            (
                "media positions",
                Box::new(|ix| ix.mpos_off = vec![0, 0, 1]),
            ),
            ("media position 4", Box::new(|ix| ix.mpos = vec![4])),
            ("source 2 out of range", Box::new(|ix| ix.img_source[2] = 2)),
            ("file 1 out of range", Box::new(|ix| ix.img_file[0] = 1)),
            ("byte range (-1, 10)", Box::new(|ix| ix.img_off[1] = -1)),
            (
                "values of width",
                Box::new(|ix| {
                    ix.img_w.pop();
                }),
            ),
            ("num_tokens", Box::new(|ix| ix.num_tokens[1] = 7)),
            (
                "image column",
                Box::new(|ix| ix.sources[0].kind = SourceKind::Parquet),
            ),
        ];
        for (want, spoil) in cases {
            let mut ix = tiny();
            spoil(&mut ix);
            let e = ix.check().unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn fuyu_samples_count_their_image_tokens() {
        let mut ix = tiny();
        ix.fuyu = true;
        // each 30x30 image: one patch and one newline
        ix.num_tokens[0] = 3 + 2 * 2;
        ix.check().unwrap();
    }
}
