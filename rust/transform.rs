//! RGB -> model pixels: Otter's 224 squash, the CLIP resize + centre crop, Fuyu's 30x30 patches.
//!
//! Resizing is fast_image_resize's convolution, the same algorithm as Pillow's resample (CatmullRom is
//! Pillow's BICUBIC, a = -0.5; Bilinear is Pillow's BILINEAR, both with support scaled when shrinking),
//! on 8-bit pixels as Pillow does; normalisation is then done in f32 exactly as the numpy reference
//! (`x as f32 / 255`, then `(x - mean) / std`).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::decode::Rgb;
use crate::error::{Error, Result};
use crate::limits;

pub const FLAMINGO_MEAN: [f32; 3] = [0.481, 0.458, 0.408];
pub const FLAMINGO_STD: [f32; 3] = [0.269, 0.261, 0.276];
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
pub const FUYU_PATCH: usize = 30;

pub fn resize(img: &Rgb, width: u32, height: u32, filter: FilterType) -> Result<Rgb> {
    if (img.width, img.height) == (width, height) {
        return Ok(img.clone());
    }
    let src = ImageRef::new(img.width, img.height, &img.data, PixelType::U8x3)
        .map_err(|e| Error::BadPixels(format!("resize: {e}")))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let mut resizer = Resizer::new();
    resizer
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)),
        )
        .map_err(|e| Error::BadPixels(format!("resize: {e}")))?;
    Ok(Rgb {
        width,
        height,
        data: dst.into_vec(),
    })
}

/// HWC u8 -> CHW f32, normalised, into `out` (3 * width * height values).
pub fn normalise_chw(img: &Rgb, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) -> Result<()> {
    let n = img.width as usize * img.height as usize;
    // The slot comes from the batch layout; a mismatch is a bug here, reported rather than a slice panic.
    if img.data.len() != 3 * n {
        return Err(Error::Runtime(format!(
            "internal: {} bytes for {}x{} pixels",
            img.data.len(),
            img.width,
            img.height
        )));
    }
    normalise_hwc(&img.data, mean, std, out)
}

/// `normalise_chw` on bare HWC bytes (a pixel cache's slot): `out` holds as many values as `hwc` bytes.
pub fn normalise_hwc(hwc: &[u8], mean: [f32; 3], std: [f32; 3], out: &mut [f32]) -> Result<()> {
    let n = hwc.len() / 3;
    if out.len() != 3 * n || hwc.len() != 3 * n {
        return Err(Error::Runtime(format!(
            "internal: {} pixel bytes for a slot of {} values",
            hwc.len(),
            out.len()
        )));
    }
    for c in 0..3 {
        // A lookup table per channel: the same f32 operations as the numpy reference, done 256 times.
        let mut lut = [0f32; 256];
        for (v, o) in lut.iter_mut().enumerate() {
            *o = (v as f32 / 255.0 - mean[c]) / std[c];
        }
        let plane = &mut out[c * n..(c + 1) * n];
        for (i, v) in plane.iter_mut().enumerate() {
            *v = lut[hwc[i * 3 + c] as usize];
        }
    }
    Ok(())
}

/// Otter's training transform: Resize((size, size), BICUBIC), ToTensor, Normalize(FLAMINGO stats).
pub fn otter_pixels_into(img: &Rgb, size: u32, out: &mut [f32]) -> Result<()> {
    normalise_chw(&otter_square(img, size)?, FLAMINGO_MEAN, FLAMINGO_STD, out)
}

/// Otter's 8-bit `size x size` image before normalisation (what a pixel cache stores).
pub fn otter_square(img: &Rgb, size: u32) -> Result<Rgb> {
    resize(img, size, size, FilterType::CatmullRom)
}

pub fn otter_pixels(img: &Rgb, size: u32, out: &mut Vec<f32>) -> Result<()> {
    let base = out.len();
    out.resize(base + 3 * (size as usize).pow(2), 0.0);
    otter_pixels_into(img, size, &mut out[base..])
}

pub fn clip_pixels(img: &Rgb, size: u32, max_pixels: u64, out: &mut Vec<f32>) -> Result<()> {
    let base = out.len();
    out.resize(base + 3 * (size as usize).pow(2), 0.0);
    clip_pixels_into(img, size, max_pixels, &mut out[base..])
}

/// CLIP's resize of a `width x height` image: (short side -> size, long side truncated), refused by
/// limits.rs when a side would be 0 or the whole over `max_pixels` (a 1 x 500,000 strip: 224 x 112,000,000).
pub fn clip_resized_size(
    width: u32,
    height: u32,
    size: u32,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    let (w, h) = (width as u64, height as u64);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == 0 {
        return Err(Error::BadHeader(format!("zero-sized image {w}x{h}")));
    }
    // Python's int(size * long / short): an exact integer product, one correctly rounded division.
    let new_long = ((size as u64 * long) as f64 / short as f64) as u64;
    let (nw, nh) = if w <= h {
        (size as u64, new_long)
    } else {
        (new_long, size as u64)
    };
    limits::check_resized("CLIP's resize", width, height, nw, nh, max_pixels)?;
    let side = |v: u64| {
        u32::try_from(v).map_err(|_| Error::TooLarge(format!("{width}x{height}: resized side {v}")))
    };
    Ok((side(nw)?, side(nh)?))
}

/// CLIPImageProcessor: shortest edge -> size (bicubic, long side truncated), centre crop, CLIP stats.
pub fn clip_pixels_into(img: &Rgb, size: u32, max_pixels: u64, out: &mut [f32]) -> Result<()> {
    normalise_chw(
        &clip_square(img, size, max_pixels)?,
        CLIP_MEAN,
        CLIP_STD,
        out,
    )
}

/// CLIP's 8-bit `size x size` crop before normalisation (what a pixel cache stores).
pub fn clip_square(img: &Rgb, size: u32, max_pixels: u64) -> Result<Rgb> {
    let (nw, nh) = clip_resized_size(img.width, img.height, size, max_pixels)?;
    let r = resize(img, nw, nh, FilterType::CatmullRom)?;
    // Both sides are >= size (the short one is size, the long one size * long / short); a resize that
    // broke that is reported, not a slice panic.
    let bug = || Error::Runtime(format!("internal: CLIP crop of {size} from {nw}x{nh}"));
    let top = (nh.checked_sub(size).ok_or_else(bug)? / 2) as usize;
    let left = (nw.checked_sub(size).ok_or_else(bug)? / 2) as usize;
    let s = size as usize;
    let mut crop = Vec::with_capacity(s * s * 3);
    for y in 0..s {
        let row = (top + y) * nw as usize * 3;
        let px = r
            .data
            .get(row + left * 3..row + (left + s) * 3)
            .ok_or_else(bug)?;
        crop.extend_from_slice(px);
    }
    Ok(Rgb {
        width: size,
        height: size,
        data: crop,
    })
}

/// FuyuImageProcessor's resize rule: shrink to fit keeping the aspect ratio, never upscale.
pub fn fuyu_resized_size(height: u32, width: u32, max_h: u32, max_w: u32) -> (u32, u32) {
    if height <= max_h && width <= max_w {
        return (height, width);
    }
    let s = f64::min(max_h as f64 / height as f64, max_w as f64 / width as f64);
    ((height as f64 * s) as u32, (width as f64 * s) as u32)
}

/// `fuyu_resized_size`, refused by limits.rs when a side would be 0 (a strip longer than max_h or max_w
/// times its width); never larger than the image itself, which limits::check_size bounded.
pub fn fuyu_checked_size(height: u32, width: u32, max_h: u32, max_w: u32) -> Result<(u32, u32)> {
    let (nh, nw) = fuyu_resized_size(height, width, max_h, max_w);
    let what = format!("Fuyu's fit into {max_h}x{max_w}");
    let own = width as u64 * height as u64;
    limits::check_resized(&what, width, height, nw as u64, nh as u64, own)?;
    Ok((nh, nw))
}

/// (patch rows, patch columns) for an image of this original size.
pub fn fuyu_grid(height: u32, width: u32, max_h: u32, max_w: u32) -> (usize, usize) {
    let (h, w) = fuyu_resized_size(height, width, max_h, max_w);
    (
        (h as usize).div_ceil(FUYU_PATCH),
        (w as usize).div_ceil(FUYU_PATCH),
    )
}

pub const PATCH_DIM: usize = FUYU_PATCH * FUYU_PATCH * 3;

/// Fuyu patches appended to `out`; see `fuyu_patches_into`.
pub fn fuyu_patches(
    img: &Rgb,
    max_h: u32,
    max_w: u32,
    out: &mut Vec<f32>,
) -> Result<(usize, usize)> {
    let (rows, cols) = fuyu_grid(img.height, img.width, max_h, max_w);
    let base = out.len();
    out.resize(base + rows * cols * PATCH_DIM, 0.0);
    fuyu_patches_into(img, max_h, max_w, &mut out[base..])
}

/// Fuyu patches into `out` (rows*cols*2700 values) as (rows*cols, 30*30*3) f32 in [-1, 1], raster order,
/// each patch flattened (patch_h, patch_w, channel); the padding (bottom/right, to a multiple of 30) is
/// 1.0 on the 0..255 scale.
pub fn fuyu_patches_into(
    img: &Rgb,
    max_h: u32,
    max_w: u32,
    out: &mut [f32],
) -> Result<(usize, usize)> {
    let (nh, nw) = fuyu_checked_size(img.height, img.width, max_h, max_w)?;
    let resized;
    let img = if (nh, nw) != (img.height, img.width) {
        resized = resize(img, nw, nh, FilterType::Bilinear)?;
        &resized
    } else {
        img
    };
    let (h, w) = (nh as usize, nw as usize);
    let (rows, cols) = (h.div_ceil(FUYU_PATCH), w.div_ceil(FUYU_PATCH));
    let pad = (1.0f32 * (1.0f32 / 255.0) - 0.5) / 0.5;
    let mut lut = [0f32; 256];
    for (v, o) in lut.iter_mut().enumerate() {
        *o = (v as f32 * (1.0f32 / 255.0) - 0.5) / 0.5;
    }
    if img.data.len() != h * w * 3 {
        return Err(Error::Runtime(format!(
            "internal: {} bytes for a {w}x{h} image",
            img.data.len()
        )));
    }
    if out.len() != rows * cols * PATCH_DIM {
        return Err(Error::BadPixels(format!(
            "image is {}x{}, its header said otherwise",
            img.width, img.height
        )));
    }
    out.fill(pad);
    let mut k = 0;
    for pr in 0..rows {
        for pc in 0..cols {
            for y in pr * FUYU_PATCH..(pr + 1) * FUYU_PATCH {
                for x in pc * FUYU_PATCH..(pc + 1) * FUYU_PATCH {
                    if y < h && x < w {
                        let i = (y * w + x) * 3;
                        out[k] = lut[img.data[i] as usize];
                        out[k + 1] = lut[img.data[i + 1] as usize];
                        out[k + 2] = lut[img.data[i + 2] as usize];
                    }
                    k += 3;
                }
            }
        }
    }
    Ok((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuyu_counts() {
        // otter-reference 4.2 token table: rows * cols + rows
        for (side, n) in [
            (224u32, 72usize),
            (448, 240),
            (512, 342),
            (768, 702),
            (1080, 1332),
        ] {
            let (r, c) = fuyu_grid(side, side, 1080, 1920);
            assert_eq!(r * c + r, n);
        }
        assert_eq!(fuyu_resized_size(2160, 1000, 1080, 1920), (1080, 500));
    }

    fn noise(width: u32, height: u32) -> Rgb {
        let n = (width * height * 3) as usize;
        Rgb {
            width,
            height,
            data: (0..n).map(|i| (i * 37 % 251) as u8).collect(),
        }
    }

    /// Every transform at 1 x N, N x 1 and the longest strips the size rule allows (200:1, here up to
    /// 40,000 x 200: CLIP then resizes to 44,800 x 224): the right shape or a named refusal, never a panic.
    #[test]
    fn every_transform_at_extreme_sizes() {
        let max = limits::DEFAULT_MAX_PIXELS;
        for (w, h) in [
            (1, 1),
            (1, 200),
            (200, 1),
            (1, 2),
            (2, 1),
            (200, 40_000),
            (40_000, 200),
            (1, 29),
            (31, 1),
        ] {
            assert!(limits::check_size(w, h, max).is_ok());
            let img = noise(w, h);
            let mut out = Vec::new();
            otter_pixels(&img, 224, &mut out).unwrap();
            assert_eq!(out.len(), 3 * 224 * 224);
            out.clear();
            clip_pixels(&img, 224, max, &mut out).unwrap();
            assert_eq!(out.len(), 3 * 224 * 224);
            assert!(out.iter().all(|v| v.is_finite()));
            out.clear();
            let (rows, cols) = fuyu_patches(&img, 1080, 1920, &mut out).unwrap();
            assert_eq!(out.len(), rows * cols * PATCH_DIM);
            assert!(rows >= 1 && cols >= 1);
        }
        // Past the rule: each transform refuses by name before allocating.
        let strip = noise(1, 1000);
        let mut out = Vec::new();
        let e = clip_pixels(&strip, 224, 224 * 224_000 - 1, &mut out).unwrap_err();
        assert_eq!(e.code(), "image_too_large");
        let e = fuyu_patches(&strip, 100, 1920, &mut out).unwrap_err();
        assert_eq!(e.code(), "extreme_aspect_ratio");
        assert_eq!(
            clip_resized_size(1, 500_000, 224, max).unwrap_err().code(),
            "image_too_large"
        );
        assert_eq!(
            clip_resized_size(u32::MAX, 1, 16_384, u64::MAX)
                .unwrap_err()
                .code(),
            "image_too_large"
        );
        assert_eq!(
            clip_resized_size(0, 7, 224, max).unwrap_err().code(),
            "bad_header"
        );
    }

    #[test]
    fn fuyu_padding_value() {
        let img = Rgb {
            width: 1,
            height: 1,
            data: vec![255, 0, 255],
        };
        let mut out = Vec::new();
        assert_eq!(fuyu_patches(&img, 1080, 1920, &mut out).unwrap(), (1, 1));
        assert_eq!(out.len(), 2700);
        assert_eq!(&out[..3], &[1.0, -1.0, 1.0]);
        assert!((out[3] - (1.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7);
    }
}
