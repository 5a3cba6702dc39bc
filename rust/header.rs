//! Image headers: width, height and format of an encoded image, read without decoding pixels.
//!
//! `data prepare` needs every image's size to plan token counts (Fuyu) and to refuse decompression
//! bombs before anything is decoded. Base64 payloads (Otter's parquet layout) are decoded here too,
//! in the standard or the URL-safe alphabet, as Otter's `urlsafe_b64decode` accepts both.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use std::io::Cursor;

use crate::error::{catch_panic, Error, Result};

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
    let (width, height) = catch_panic(
        || {
            image::ImageReader::with_format(Cursor::new(bytes), fmt)
                .into_dimensions()
                .map_err(|e| Error::BadHeader(e.to_string()))
        },
        |m| Error::BadHeader(format!("the {name} header reader panicked: {m}")),
    )?;
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

/// Probe one blob, base64-decoding it first when `is_base64`: its header, and whether its data is all there
/// (complete.rs; read from the structure, nothing decoded), so that prepare counts a cut image as
/// `truncated_image` where the loaders would refuse it.
pub fn probe_blob(blob: &[u8], is_base64: bool) -> Result<Header> {
    let raw;
    let bytes = if is_base64 {
        raw = decode_base64(blob)?;
        &raw[..]
    } else {
        blob
    };
    let h = probe_bytes(bytes)?;
    if let Some((fmt, _)) = sniff_format(bytes) {
        crate::complete::check_complete(bytes, fmt)?;
    }
    Ok(h)
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

    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        let mut chunk = b"IHDR".to_vec();
        chunk.extend_from_slice(&ihdr);
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
        // An IDAT of an empty zlib stream, then IEND: the reader wants the first IDAT before it answers.
        for (kind, body) in [
            (&b"IDAT"[..], &[0x78, 0x9c, 0x03, 0, 0, 0, 0, 1][..]),
            (b"IEND", &[]),
        ] {
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            let mut chunk = kind.to_vec();
            chunk.extend_from_slice(body);
            out.extend_from_slice(&chunk);
            out.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    fn gif_header(w: u16, h: u16) -> Vec<u8> {
        let mut out = b"GIF89a".to_vec();
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0]);
        // One 1x1 frame (the reader wants the first frame's descriptor), no pixel data, the trailer.
        out.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 0, 0x3B]);
        out
    }

    fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8];
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&[1, 1, 0x11, 0, 0xFF, 0xD9]);
        out
    }

    fn webp_vp8l(w: u32, h: u32) -> Vec<u8> {
        let bits = (w - 1) | ((h - 1) << 14);
        let mut body = b"WEBPVP8L".to_vec();
        body.extend_from_slice(&5u32.to_le_bytes());
        body.push(0x2F);
        body.extend_from_slice(&bits.to_le_bytes());
        body.push(0); // pad to an even chunk size
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn webp_vp8x(w: u32, h: u32) -> Vec<u8> {
        let mut body = b"WEBPVP8X".to_vec();
        body.extend_from_slice(&10u32.to_le_bytes());
        body.extend_from_slice(&[0, 0, 0, 0]);
        body.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
        body.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Headers declaring extreme sizes in every format: read (or refused) without a panic; decoding them
    /// is refused by the size rule or fails on the missing pixels, never allocating the declared size.
    #[test]
    fn extreme_declared_sizes_never_panic_or_allocate() {
        let big = (1u32 << 31) - 1;
        let mut blobs = vec![
            (png_header(1, big), Some((1, big))),
            (png_header(big, 1), None), // the png crate refuses a row that long: "Memory limit exceeded"
            (png_header(big, big), None),
            (png_header(1, 200), Some((1, 200))),
            (gif_header(65_535, 1), Some((65_535, 1))),
            (gif_header(1, 65_535), Some((1, 65_535))),
            (gif_header(65_535, 65_535), Some((65_535, 65_535))),
            (webp_vp8x(1 << 24, 1), None), // a canvas without an image chunk
            (webp_vp8x(1 << 24, 1 << 24), None),
            // VP8L's largest side is 16,384, but image-webp 0.2.4 reads it as 0 (PIL reads 16,384): refused
            // as a zero-sized bad_header, not a panic; 16,383 is read right.
            (webp_vp8l(16_384, 1), None),
            (webp_vp8l(16_383, 1), Some((16_383, 1))),
            (webp_vp8l(1, 16_383), Some((1, 16_383))),
            (webp_vp8l(16_383, 16_383), Some((16_383, 16_383))),
        ];
        for (w, h) in [(65_535, 65_535), (1, 65_535), (65_535, 1), (0, 5), (5, 0)] {
            blobs.push((jpeg_header(w, h), None)); // zune-jpeg may want more than a SOF
        }
        blobs.push((png_header(0, 5), None));
        blobs.push((gif_header(0, 0), None));
        for (blob, want) in blobs {
            let probed = probe_bytes(&blob);
            if let Some((w, h)) = want {
                let got = probed.as_ref().map(|p| (p.width, p.height));
                assert_eq!(got, Ok((w, h)), "{:?}", &blob[..blob.len().min(16)]);
            }
            if let Ok(p) = &probed {
                assert!(p.width > 0 && p.height > 0);
            }
            let decoded = crate::decode::decode_rgb(&blob, crate::limits::DEFAULT_MAX_PIXELS);
            assert!(decoded.is_err());
            let drafted =
                crate::decode::decode_rgb_draft(&blob, 224, 224, crate::limits::DEFAULT_MAX_PIXELS);
            assert!(drafted.is_err());
        }
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
