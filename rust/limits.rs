//! How large and how elongated an image may be, decided from its header size before a pixel is allocated.
//!
//! Decoders and resizers allocate their output in one piece, and a failed allocation in Rust aborts the
//! process (on_error="skip" cannot catch it). So every size is checked here first, in u64 (no overflow):
//!
//!   * no side 0, and long side <= MAX_ASPECT_RATIO x short side: a 1 x 500,000 strip would otherwise
//!     become a 224 x 112,000,000 buffer under CLIP's "short side to 224";
//!   * width x height <= max_pixels (the index's --max-image-pixels, PIL's bomb limit by default);
//!   * every resized intermediate (CLIP's short-side resize, Fuyu's fit into max_h x max_w) has both sides
//!     >= 1 and at most max_pixels pixels.
//!
//! The rule is python/otterfast/data/images.py `size_defect` / `check_resized`, word for word, so that
//! prepare, the reference loader and this loader refuse the same images (tests/test_image_bounds.py).

use crate::error::{Error, Result};

/// Long side / short side at most this. transformers' Qwen2-VL processor refuses the same ratio (its
/// `MAX_RATIO`); real panoramas and long screenshots stay well below it.
pub const MAX_ASPECT_RATIO: u64 = 200;

/// PIL's `Image.MAX_IMAGE_PIXELS`, the default of `data prepare --max-image-pixels`.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Refuse a header size that is empty, too elongated or too large (checked in this order).
pub fn check_size(width: u32, height: u32, max_pixels: u64) -> Result<()> {
    let (w, h) = (width as u64, height as u64);
    if w == 0 || h == 0 {
        return Err(Error::BadHeader(format!("zero-sized image {w}x{h}")));
    }
    let (short, long) = (w.min(h), w.max(h));
    if long > MAX_ASPECT_RATIO * short {
        return Err(Error::ExtremeAspect(format!(
            "{w}x{h}: long side over {MAX_ASPECT_RATIO} x short side"
        )));
    }
    if w * h > max_pixels {
        return Err(Error::TooLarge(format!(
            "{w}x{h} = {} pixels > max_image_pixels {max_pixels}",
            w * h
        )));
    }
    Ok(())
}

/// Refuse a resized intermediate of `width x height` made from an image of `from_w x from_h` by `what`.
pub fn check_resized(
    what: &str,
    from_w: u32,
    from_h: u32,
    width: u64,
    height: u64,
    max_pixels: u64,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::ExtremeAspect(format!(
            "{from_w}x{from_h}: {what} would make it {width}x{height}"
        )));
    }
    match width.checked_mul(height) {
        Some(n) if n <= max_pixels => Ok(()),
        _ => Err(Error::TooLarge(format!(
            "{from_w}x{from_h}: {what} would make it {width}x{height}, over max_image_pixels {max_pixels}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_ratio_bound_is_inclusive() {
        assert!(check_size(1, 200, DEFAULT_MAX_PIXELS).is_ok());
        assert!(check_size(200, 1, DEFAULT_MAX_PIXELS).is_ok());
        assert_eq!(
            check_size(1, 201, DEFAULT_MAX_PIXELS).unwrap_err().code(),
            "extreme_aspect_ratio"
        );
        assert_eq!(
            check_size(500_000, 1, DEFAULT_MAX_PIXELS)
                .unwrap_err()
                .code(),
            "extreme_aspect_ratio"
        );
    }

    #[test]
    fn pixels_and_zero_sides() {
        assert!(check_size(9459, 9459, DEFAULT_MAX_PIXELS).is_ok()); // 89,472,681
        assert_eq!(
            check_size(9460, 9460, DEFAULT_MAX_PIXELS)
                .unwrap_err()
                .code(),
            "image_too_large"
        );
        assert_eq!(
            check_size(u32::MAX, u32::MAX, DEFAULT_MAX_PIXELS)
                .unwrap_err()
                .code(),
            "image_too_large"
        );
        assert_eq!(check_size(0, 5, 100).unwrap_err().code(), "bad_header");
        assert!(check_resized("x", 1, 1, u64::MAX, 2, u64::MAX).is_err());
        assert!(check_resized("x", 1, 1, 0, 2, 100).is_err());
        assert!(check_resized("x", 1, 1, 10, 10, 100).is_ok());
    }
}
