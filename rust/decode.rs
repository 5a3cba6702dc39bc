//! Encoded image bytes -> 8-bit RGB, the way PIL's `Image.open(...).convert("RGB")` does.
//!
//! Decoders: the `image` crate (zune-jpeg for JPEG, png, image-webp, gif: first frame). Where PIL's
//! conversion rules differ from the crate's defaults we follow PIL, since Otter's data path is PIL:
//! 16-bit greyscale is clipped to 255 (PIL's "I;16" -> "RGB"), 16-bit colour keeps the high byte,
//! alpha is dropped without compositing.

use image::{DynamicImage, ImageFormat};

use crate::complete::check_complete;
use crate::error::{catch_panic, Error, Result};
use crate::header::{decode_base64, probe_bytes, sniff_format};
use crate::limits;

/// An RGB image, rows of `width * 3` bytes.
#[derive(Debug, Clone)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// The format of `bytes`, after checking its header size against limits.rs (before anything is allocated)
/// and that its data is all there (complete.rs: the decoders would fill in a cut file without a word).
fn checked_format(bytes: &[u8], max_pixels: u64) -> Result<ImageFormat> {
    let h = probe_bytes(bytes)?;
    limits::check_size(h.width, h.height, max_pixels)?;
    let fmt = sniff_format(bytes)
        .map(|(f, _)| f)
        .ok_or(Error::NotAnImage)?;
    check_complete(bytes, fmt)?;
    Ok(fmt)
}

/// Decode to RGB, refusing a header size limits.rs refuses (`max_pixels`: the index's --max-image-pixels).
/// The caller adds the file and image id to an error (`Error::at_image`).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<Rgb> {
    let fmt = checked_format(bytes, max_pixels)?;
    decode_full(bytes, fmt)
}

fn decode_full(bytes: &[u8], fmt: ImageFormat) -> Result<Rgb> {
    // A decoder panic on hostile bytes must not cross into Python: catch it and report it as bad data.
    let decoded = catch_panic(
        || {
            image::load_from_memory_with_format(bytes, fmt).map_err(|e| match e {
                // The png decoder's word for a file cut short (the structural check leaves PNG to it).
                image::ImageError::IoError(io)
                    if io.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    Error::Truncated(format!("{fmt:?}: {io}"))
                }
                e => Error::BadPixels(format!("cannot decode {fmt:?}: {e}")),
            })
        },
        |m| Error::BadPixels(format!("cannot decode {fmt:?}: the decoder panicked: {m}")),
    )?;
    Ok(to_rgb_like_pil(decoded))
}

/// PIL's `JpegImageFile.draft` rule: the largest s in {8, 4, 2, 1} with s <= min(w / req_w, h / req_h).
pub fn draft_scale(width: u32, height: u32, req_w: u32, req_h: u32) -> u32 {
    let s = (width / req_w.max(1)).min(height / req_h.max(1));
    [8, 4, 2, 1].into_iter().find(|&k| s >= k).unwrap_or(1)
}

/// Decode like `decode_rgb`, except greyscale and colour JPEGs: those go through libjpeg-turbo's decoder
/// (PIL's own, so the pixels are PIL's exactly) and, when at least twice the requested size in both axes, at
/// a reduced DCT scale (1/2, 1/4 or 1/8; output ceil(w / s) x ceil(h / s)), as PIL after
/// `img.draft("RGB", (req, req))`. Measured on a 1000x800 q90 photo: 1.7 ms at 1/2 scale vs 2.5 ms for
/// zune-jpeg's full decode and 4.8 ms for libjpeg-turbo's.
pub fn decode_rgb_draft(bytes: &[u8], req_w: u32, req_h: u32, max_pixels: u64) -> Result<Rgb> {
    let fmt = checked_format(bytes, max_pixels)?;
    if fmt != ImageFormat::Jpeg {
        return decode_full(bytes, fmt);
    }
    // libjpeg reports errors by unwinding through the mozjpeg crate (its message as the payload); catch that
    // as well as any panic.
    let attempt = catch_panic(
        || -> Result<Option<Rgb>> {
            let err = |e: std::io::Error| Error::BadPixels(format!("cannot decode Jpeg: {e}"));
            let mut d = mozjpeg::Decompress::new_mem(bytes).map_err(err)?;
            let (w, h) = d.size();
            let s = draft_scale(w as u32, h as u32, req_w, req_h);
            let colour = matches!(
                d.color_space(),
                mozjpeg::ColorSpace::JCS_YCbCr
                    | mozjpeg::ColorSpace::JCS_RGB
                    | mozjpeg::ColorSpace::JCS_GRAYSCALE
            );
            if !colour {
                return Ok(None); // CMYK/YCCK: the full decoder and PIL's conversion rules
            }
            d.scale((8 / s) as u8);
            let mut started = d.rgb().map_err(err)?;
            let (ow, oh) = (started.width(), started.height());
            let px: Vec<[u8; 3]> = started.read_scanlines().map_err(err)?;
            started.finish().map_err(err)?;
            if px.len() != ow * oh {
                return Err(Error::BadPixels(
                    "cannot decode Jpeg: truncated image data".into(),
                ));
            }
            Ok(Some(Rgb {
                width: ow as u32,
                height: oh as u32,
                data: px.into_iter().flatten().collect(),
            }))
        },
        |m| Error::BadPixels(format!("cannot decode Jpeg: {m}")),
    )?;
    match attempt {
        Some(rgb) => Ok(rgb),
        None => decode_full(bytes, fmt),
    }
}

/// A table's stored value (base64 text or raw bytes) -> RGB; `draft` as in `decode_rgb_draft`.
pub fn decode_stored(
    blob: &[u8],
    is_base64: bool,
    draft: Option<u32>,
    max_pixels: u64,
) -> Result<Rgb> {
    let raw;
    let bytes: &[u8] = if is_base64 {
        raw = decode_base64(blob)?;
        &raw
    } else {
        blob
    };
    match draft {
        Some(size) => decode_rgb_draft(bytes, size, size, max_pixels),
        None => decode_rgb(bytes, max_pixels),
    }
}

fn to_rgb_like_pil(img: DynamicImage) -> Rgb {
    let (width, height) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageLuma16(g) => g
            .into_raw()
            .into_iter()
            .flat_map(|v| [v.min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageLumaA16(g) => g
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0].min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageRgb16(c) => c.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(c) => c
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.into_rgb8().into_raw(),
    };
    Rgb {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::DEFAULT_MAX_PIXELS;
    use std::io::Cursor;

    #[test]
    fn png_roundtrip_exact() {
        let img =
            image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        let out = decode_rgb(&buf, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((out.width, out.height), (5, 3));
        assert_eq!(out.data, img.into_raw());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_rgb(b"nope", DEFAULT_MAX_PIXELS).is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF, 0x00, 0x01], DEFAULT_MAX_PIXELS).is_err());
    }
}
