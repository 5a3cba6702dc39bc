//! One stored image -> the model's pixels: decode (decode.rs), then Otter's square resize, CLIP's crop or
//! Fuyu's patches (transform.rs). The one place that picks the transform and the JPEG draft size, shared
//! by the batch pipeline and the single-image binding used by tests.

use crate::config::{Config, ImageTransform};
use crate::decode::{decode_stored, Rgb};
use crate::error::{Error, Result};
use crate::index::IndexData;
use crate::transform;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixels {
    /// (3, size, size) f32, Otter's normalisation.
    Otter { size: u32 },
    /// (3, size, size) f32, CLIP's normalisation.
    Clip { size: u32 },
    /// (rows * cols, 2700) f32 patches.
    Fuyu { max_h: u32, max_w: u32 },
}

impl Pixels {
    /// The loader's transform: Fuyu for a Fuyu index, else the configured one.
    pub fn of(ix: &IndexData, cfg: &Config) -> Pixels {
        if ix.fuyu {
            return Pixels::Fuyu {
                max_h: ix.fuyu_max_h,
                max_w: ix.fuyu_max_w,
            };
        }
        match cfg.image_transform {
            ImageTransform::Otter => Pixels::Otter {
                size: cfg.image_size,
            },
            ImageTransform::Clip => Pixels::Clip {
                size: cfg.image_size,
            },
        }
    }

    /// A transform by name ("otter", "clip", "fuyu"), for the single-image binding.
    pub fn named(mode: &str, size: u32, max_h: u32, max_w: u32) -> Result<Pixels> {
        // The loader's bound (config.rs); the output alone is 3 * size^2 floats.
        if mode != "fuyu" && !(1..=16_384).contains(&size) {
            return Err(Error::Invalid(format!("size {size} not in [1, 16384]")));
        }
        if mode == "fuyu" && (max_h == 0 || max_w == 0) {
            return Err(Error::Invalid(format!(
                "max_h x max_w {max_h}x{max_w} is empty"
            )));
        }
        match mode {
            "otter" => Ok(Pixels::Otter { size }),
            "clip" => Ok(Pixels::Clip { size }),
            "fuyu" => Ok(Pixels::Fuyu { max_h, max_w }),
            _ => Err(Error::Invalid(format!("unknown mode {mode:?}"))),
        }
    }

    /// The JPEG draft size (decode at reduced DCT scale) when asked for; never for Fuyu's patches,
    /// which are cut at full resolution.
    fn draft(self, jpeg_draft: bool) -> Option<u32> {
        match self {
            Pixels::Otter { size } | Pixels::Clip { size } if jpeg_draft => Some(size),
            _ => None,
        }
    }

    /// Decode `blob` and write its pixels into `slot`, sized by the batch layout. Every size is checked
    /// against limits.rs (`max_pixels`: the index's --max-image-pixels) before it is allocated.
    pub fn write(
        self,
        blob: &[u8],
        is_base64: bool,
        jpeg_draft: bool,
        max_pixels: u64,
        slot: &mut [f32],
    ) -> Result<()> {
        let rgb = decode_stored(blob, is_base64, self.draft(jpeg_draft), max_pixels)?;
        match self {
            Pixels::Otter { size } => transform::otter_pixels_into(&rgb, size, slot),
            Pixels::Clip { size } => transform::clip_pixels_into(&rgb, size, max_pixels, slot),
            Pixels::Fuyu { max_h, max_w } => {
                transform::fuyu_patches_into(&rgb, max_h, max_w, slot).map(|_| ())
            }
        }
    }

    /// Otter's or CLIP's 8-bit `size x size` image before normalisation (pixel_cache.rs stores these);
    /// `write` is `square` then `normalise`.
    pub fn square(
        self,
        blob: &[u8],
        is_base64: bool,
        jpeg_draft: bool,
        max_pixels: u64,
    ) -> Result<Rgb> {
        let rgb = decode_stored(blob, is_base64, self.draft(jpeg_draft), max_pixels)?;
        match self {
            Pixels::Otter { size } => transform::otter_square(&rgb, size),
            Pixels::Clip { size } => transform::clip_square(&rgb, size, max_pixels),
            Pixels::Fuyu { .. } => Err(Error::Invalid(
                "Fuyu patches have no fixed-size square to cache".into(),
            )),
        }
    }

    /// The bytes of one `square` (HWC u8) -> the model's pixels in `slot`, as `write` normalises them.
    pub fn normalise(self, square: &[u8], slot: &mut [f32]) -> Result<()> {
        let (mean, std) = match self {
            Pixels::Otter { .. } => (transform::FLAMINGO_MEAN, transform::FLAMINGO_STD),
            Pixels::Clip { .. } => (transform::CLIP_MEAN, transform::CLIP_STD),
            Pixels::Fuyu { .. } => {
                return Err(Error::Invalid(
                    "Fuyu patches have no fixed-size square to cache".into(),
                ))
            }
        };
        if square.len() != self.square_bytes() {
            return Err(Error::Runtime(format!(
                "internal: a cached square of {} bytes, {} expected",
                square.len(),
                self.square_bytes()
            )));
        }
        transform::normalise_hwc(square, mean, std, slot)
    }

    /// Bytes of one `square`: 3 * size^2 (0 for Fuyu, which has none).
    pub fn square_bytes(self) -> usize {
        match self {
            Pixels::Otter { size } | Pixels::Clip { size } => 3 * (size as usize).pow(2),
            Pixels::Fuyu { .. } => 0,
        }
    }

    /// Decode `blob` into a fresh buffer: (values, patch rows, patch cols); rows = cols = 0 unless Fuyu.
    pub fn render(
        self,
        blob: &[u8],
        is_base64: bool,
        jpeg_draft: bool,
        max_pixels: u64,
    ) -> Result<(Vec<f32>, usize, usize)> {
        let rgb = decode_stored(blob, is_base64, self.draft(jpeg_draft), max_pixels)?;
        let mut out = Vec::new();
        match self {
            Pixels::Otter { size } => {
                transform::otter_pixels(&rgb, size, &mut out).map(|_| (out, 0, 0))
            }
            Pixels::Clip { size } => {
                transform::clip_pixels(&rgb, size, max_pixels, &mut out).map(|_| (out, 0, 0))
            }
            Pixels::Fuyu { max_h, max_w } => {
                transform::fuyu_patches(&rgb, max_h, max_w, &mut out).map(|(r, c)| (out, r, c))
            }
        }
    }
}
