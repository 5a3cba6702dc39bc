//! Whether encoded image data is all there, read from its structure without decoding.
//!
//! Our decoders fill in what a cut file lacks and report success: libjpeg-turbo (behind a memory source
//! that fakes the end-of-image marker) and zune-jpeg both return a JPEG cut anywhere after its header, and
//! image-webp returns a WebP a few bytes short. PIL refuses all of these ("image file is truncated"), so the
//! reference loader does, and training on the filled-in pixels would be silent damage. The rules are PIL's:
//!
//!   * JPEG: the marker structure, walked segment by segment (entropy-coded data skipped to its next marker),
//!     must reach an end-of-image marker (FF D9). Data after it is ignored, as PIL does; a scan cut short but
//!     followed by the marker is accepted, as PIL (libjpeg warns and fills) does.
//!   * WebP: the RIFF size must fit in the bytes (libwebp's demuxer refuses it otherwise).
//!   * GIF: every data sub-block of the first frame (the frame PIL and we decode) must be whole; its
//!     terminator block and the trailer may be missing, as PIL allows. (A cut exactly between two
//!     sub-blocks is only visible in the LZW stream: the decoder refuses it, not by this name.)
//!   * PNG: left to the decoder, which is stricter than PIL (it wants IEND; PIL stops at the last row).
//!
//! A cut file is `Error::Truncated` (defect `truncated_image`); structure this walk does not understand is
//! left to the decoder, which names it.

use image::ImageFormat;

use crate::error::{Error, Result};

/// Refuse `bytes` of format `fmt` when they end before the image does.
pub fn check_complete(bytes: &[u8], fmt: ImageFormat) -> Result<()> {
    match fmt {
        ImageFormat::Jpeg => jpeg(bytes),
        ImageFormat::WebP => webp(bytes),
        ImageFormat::Gif => gif(bytes),
        _ => Ok(()),
    }
}

fn cut(what: &str, n: usize) -> Error {
    Error::Truncated(format!("{what} (the data ends at byte {n})"))
}

fn jpeg(b: &[u8]) -> Result<()> {
    let n = b.len();
    let missing = || cut("JPEG without its end-of-image marker", n);
    let mut pos = 2; // after SOI
    loop {
        // To the next marker: libjpeg skips stray bytes before one, and any number of FF fill bytes.
        while pos < n && b[pos] != 0xFF {
            pos += 1;
        }
        while pos < n && b[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = b.get(pos) else {
            return Err(missing());
        };
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            // Standalone markers (no length): SOI, TEM, RST0-7; FF 00 is a stuffed byte, not a marker.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let len = match b.get(pos..pos + 2) {
            Some(l) => u16::from_be_bytes([l[0], l[1]]) as usize,
            None => return Err(missing()),
        };
        if len < 2 {
            return Ok(()); // a bogus segment length: the decoder's error to name
        }
        pos += len;
        if pos > n {
            return Err(missing());
        }
        if marker == 0xDA {
            pos = skip_entropy_coded(b, pos).ok_or_else(missing)?;
        }
    }
}

/// From the start of a scan's entropy-coded data, the position of the marker that ends it: the first FF
/// (after fill FFs) followed by neither a stuffed 00 nor a restart marker. None when the data ends first.
fn skip_entropy_coded(b: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let ff = pos + b.get(pos..)?.iter().position(|&x| x == 0xFF)?;
        let mut next = ff + 1;
        while b.get(next) == Some(&0xFF) {
            next += 1;
        }
        match *b.get(next)? {
            0x00 | 0xD0..=0xD7 => pos = next + 1,
            _ => return Some(next - 1), // the marker's last FF: the walk reads it as a marker
        }
    }
}

fn webp(b: &[u8]) -> Result<()> {
    let Some(size) = b.get(4..8) else {
        return Err(cut("WebP without its RIFF size", b.len()));
    };
    let riff = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as u64;
    if 8 + riff > b.len() as u64 {
        return Err(cut(
            &format!("WebP shorter than its RIFF size {}", 8 + riff),
            b.len(),
        ));
    }
    Ok(())
}

fn gif(b: &[u8]) -> Result<()> {
    let n = b.len();
    let missing = || cut("GIF whose first frame's image data is cut", n);
    let Some(&flags) = b.get(10) else {
        return Err(missing());
    };
    let table = |flags: u8| {
        if flags & 0x80 != 0 {
            3usize << ((flags & 7) + 1)
        } else {
            0
        }
    };
    let mut pos = 13 + table(flags); // header, logical screen descriptor, global colour table
                                     // Sub-blocks (a length byte, then that many bytes) up to the zero-length terminator; the position after it.
    let sub_blocks = |mut pos: usize| -> Option<usize> {
        loop {
            let len = *b.get(pos)? as usize;
            pos += 1 + len;
            if len == 0 {
                return Some(pos);
            }
        }
    };
    loop {
        match b.get(pos) {
            None => return Err(missing()),
            Some(0x21) => pos = sub_blocks(pos + 2).ok_or_else(missing)?, // extension: label, sub-blocks
            Some(0x2C) => {
                let flags = *b.get(pos + 9).ok_or_else(missing)?;
                pos += 10 + table(flags) + 1; // descriptor, local colour table, LZW minimum code size
                                              // Every data sub-block whole; the terminator itself may be missing, as PIL allows.
                loop {
                    let Some(&len) = b.get(pos) else {
                        return if pos == n { Ok(()) } else { Err(missing()) };
                    };
                    pos += 1 + len as usize;
                    if pos > n {
                        return Err(missing());
                    }
                    if len == 0 {
                        return Ok(());
                    }
                }
            }
            Some(_) => return Ok(()), // a trailer before any frame, or garbage: the decoder's to name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn encoded(fmt: ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (x ^ y) as u8])
        });
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), fmt)
            .unwrap();
        out
    }

    #[test]
    fn whole_files_pass_and_every_cut_is_refused() {
        for fmt in [ImageFormat::Jpeg, ImageFormat::Gif, ImageFormat::WebP] {
            let whole = encoded(fmt, 37, 23);
            assert_eq!(check_complete(&whole, fmt), Ok(()), "{fmt:?}");
            let mut junk = whole.clone();
            junk.extend_from_slice(b"trailing junk");
            assert_eq!(check_complete(&junk, fmt), Ok(()), "{fmt:?}");
            // a GIF may lose its trailer and its last frame's terminator block
            let last = if fmt == ImageFormat::Gif { 2 } else { 0 };
            for end in 0..whole.len() - last {
                let e = check_complete(&whole[..end], fmt).map_err(|e| e.code());
                if fmt == ImageFormat::Gif && e.is_ok() {
                    // Cut exactly between two sub-blocks of the frame: only the LZW stream knows it is not
                    // over; the decoder refuses it ("Unexpected End of File").
                    let max = crate::limits::DEFAULT_MAX_PIXELS;
                    assert!(
                        crate::decode::decode_rgb(&whole[..end], max).is_err(),
                        "cut at {end}"
                    );
                    continue;
                }
                assert_eq!(e, Err("truncated_image"), "{fmt:?} cut at {end}");
            }
        }
    }

    #[test]
    fn jpeg_scan_cut_but_closed_is_accepted_as_pil_does() {
        let whole = encoded(ImageFormat::Jpeg, 64, 48);
        let mut half = whole[..whole.len() / 2].to_vec();
        half.extend_from_slice(&[0xFF, 0xD9]);
        assert_eq!(check_complete(&half, ImageFormat::Jpeg), Ok(()));
    }
}
