//! Encoded image bytes -> 8-bit RGB, the way PIL's `Image.open(...).convert("RGB")` does.
//!
//! Decoders: the `image` crate (zune-jpeg for JPEG, png, image-webp, gif: first frame). Where PIL's
//! conversion rules differ from the crate's defaults we follow PIL, since Otter's data path is PIL:
//! 16-bit greyscale is clipped to 255 (PIL's "I;16" -> "RGB"), 16-bit colour keeps the high byte,
//! alpha is dropped without compositing.

use image::{DynamicImage, ImageFormat};

use crate::header::{decode_base64, ProbeError};

/// An RGB image, rows of `width * 3` bytes.
#[derive(Debug, Clone)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else {
        None
    }
}

/// Decode to RGB. Errors are strings for the caller to prefix with the file and image id.
pub fn decode_rgb(bytes: &[u8]) -> Result<Rgb, String> {
    let fmt = sniff(bytes).ok_or_else(|| ProbeError::NotAnImage.message())?;
    // A decoder panic on hostile bytes must not cross into Python: catch it and report it as bad data.
    let decoded = std::panic::catch_unwind(|| image::load_from_memory_with_format(bytes, fmt))
        .map_err(|_| "decoder panicked on these bytes".to_string())?
        .map_err(|e| format!("cannot decode {fmt:?}: {e}"))?;
    Ok(to_rgb_like_pil(decoded))
}

/// Decode base64 text (either alphabet) then the image.
pub fn decode_rgb_base64(text: &[u8]) -> Result<Rgb, String> {
    let raw = decode_base64(text).map_err(|e| e.message())?;
    decode_rgb(&raw)
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
    use std::io::Cursor;

    #[test]
    fn png_roundtrip_exact() {
        let img =
            image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        let out = decode_rgb(&buf).unwrap();
        assert_eq!((out.width, out.height), (5, 3));
        assert_eq!(out.data, img.into_raw());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_rgb(b"nope").is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF, 0x00, 0x01]).is_err());
    }
}
