//! Image headers: width, height and format of an encoded image, read without decoding pixels.
//!
//! `data prepare` needs every image's size to plan token counts (Fuyu) and to refuse decompression
//! bombs before anything is decoded. Base64 payloads (Otter's parquet layout) are decoded here too,
//! in the standard or the URL-safe alphabet, as Otter's `urlsafe_b64decode` accepts both.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use std::io::Cursor;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    pub format: &'static str,
    /// Size of the encoded image in bytes (after base64 decoding).
    pub encoded_len: usize,
}

fn engine(alpha: &alphabet::Alphabet) -> GeneralPurpose {
    // Padding is optional in practice (some writers strip it); Python's decoder also tolerates it missing
    // only when the length allows, so accept both.
    GeneralPurpose::new(
        alpha,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Decode base64 in the standard or URL-safe alphabet (a payload uses one or the other; `+`/`/` and
/// `-`/`_` never mix in a valid one). Whitespace (line-wrapped base64) is ignored, like Python's decoder.
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>> {
    let cleaned: std::borrow::Cow<[u8]> = if text.iter().any(|b| b.is_ascii_whitespace()) {
        std::borrow::Cow::Owned(
            text.iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    let url_safe = cleaned.iter().any(|&b| b == b'-' || b == b'_');
    let alpha = if url_safe {
        &alphabet::URL_SAFE
    } else {
        &alphabet::STANDARD
    };
    engine(alpha)
        .decode(&*cleaned)
        .map_err(|e| Error::BadBase64(e.to_string()))
}

pub fn sniff_format(bytes: &[u8]) -> Option<(image::ImageFormat, &'static str)> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some((image::ImageFormat::Jpeg, "jpeg"))
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some((image::ImageFormat::Png, "png"))
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some((image::ImageFormat::WebP, "webp"))
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some((image::ImageFormat::Gif, "gif"))
    } else {
        None
    }
}

/// Read the header of encoded image bytes.
pub fn probe_bytes(bytes: &[u8]) -> Result<Header> {
    let (fmt, name) = sniff_format(bytes).ok_or(Error::NotAnImage)?;
    let reader = image::ImageReader::with_format(Cursor::new(bytes), fmt);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| Error::BadHeader(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(Error::BadHeader(format!(
            "zero-sized image {width}x{height}"
        )));
    }
    Ok(Header {
        width,
        height,
        format: name,
        encoded_len: bytes.len(),
    })
}

/// Probe one blob, base64-decoding it first when `is_base64`.
pub fn probe_blob(blob: &[u8], is_base64: bool) -> Result<Header> {
    if is_base64 {
        let raw = decode_base64(blob)?;
        probe_bytes(&raw)
    } else {
        probe_bytes(blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_1x1() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn reads_png_size() {
        let h = probe_bytes(&png_1x1()).unwrap();
        assert_eq!((h.width, h.height, h.format), (3, 2, "png"));
    }

    #[test]
    fn base64_both_alphabets() {
        let raw: Vec<u8> = (0..=255u8).collect();
        let std_text = base64::engine::general_purpose::STANDARD.encode(&raw);
        let url_text = base64::engine::general_purpose::URL_SAFE.encode(&raw);
        assert_ne!(std_text, url_text);
        assert_eq!(decode_base64(std_text.as_bytes()).unwrap(), raw);
        assert_eq!(decode_base64(url_text.as_bytes()).unwrap(), raw);
        let unpadded = url_text.trim_end_matches('=');
        assert_eq!(decode_base64(unpadded.as_bytes()).unwrap(), raw);
    }

    #[test]
    fn garbage_is_not_an_image() {
        assert_eq!(probe_bytes(b"hello world").unwrap_err(), Error::NotAnImage);
        assert_eq!(probe_bytes(b"").unwrap_err(), Error::NotAnImage);
        assert!(matches!(
            decode_base64(b"!!!!").unwrap_err(),
            Error::BadBase64(_)
        ));
    }

    #[test]
    fn truncated_header_is_an_error_not_a_panic() {
        let png = png_1x1();
        for cut in 0..png.len().min(40) {
            let _ = probe_bytes(&png[..cut]);
        }
        assert!(probe_bytes(&png[..12]).is_err());
    }
}
