//! The engine's options, read straight from the Python `LoaderConfig` (data/batching.py), attribute by
//! attribute: a new loader option is a field there and a field here, nothing in between.

use pyo3::FromPyObject;

use crate::error::{Error, Result};

/// Otter's square resize or CLIP's resize + centre crop (LoaderConfig.image_transform).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageTransform {
    Otter,
    Clip,
}

/// What a batch does about an image that fails (LoaderConfig.on_error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Raise,
    /// Leave out the samples using it, lay the batch out again, count them.
    Skip,
}

crate::option_from_str!(ImageTransform, "image_transform", "otter" => ImageTransform::Otter, "clip" => ImageTransform::Clip);

crate::option_from_str!(OnError, "on_error", "raise" => OnError::Raise, "skip" => OnError::Skip);

/// The subset of LoaderConfig the engine reads (the plan's options stay in Python and pack.rs).
#[derive(Debug, Clone, FromPyObject)]
pub struct Config {
    pub pack: bool,
    /// Tokens per packed row; data/loader.py resolves LoaderConfig's None to the index's max_seq_len.
    pub capacity: u32,
    #[pyo3(from_py_with = crate::loader::parsed)]
    pub image_transform: ImageTransform,
    pub image_size: u32,
    pub jpeg_draft: bool,
    #[pyo3(from_py_with = crate::loader::parsed)]
    pub on_error: OnError,
    /// Decoding threads; 0: all cores.
    pub num_threads: usize,
    /// Batches decoded ahead of the consumer.
    pub prefetch: usize,
    /// Images whose encoded bytes are read from the tables at once ...
    pub blob_window: usize,
    /// ... and at most this many MiB of them.
    pub blob_window_mb: usize,
}

impl Config {
    /// Options that would make the engine misbehave rather than fail cleanly later.
    pub fn check(&self) -> Result<()> {
        // 3 * size^2 f32 per frame must be addressable; 16,384 is far beyond any vision encoder.
        if !(1..=16_384).contains(&self.image_size) {
            return Err(Error::Invalid(format!(
                "image_size {} not in [1, 16384]",
                self.image_size
            )));
        }
        Ok(())
    }

    pub fn blob_window_bytes(&self) -> usize {
        self.blob_window_mb.saturating_mul(1 << 20)
    }

    pub fn threads(&self) -> usize {
        if self.num_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.num_threads
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests() -> Config {
        Config {
            pack: true,
            capacity: 16,
            image_transform: ImageTransform::Otter,
            image_size: 4,
            jpeg_draft: false,
            on_error: OnError::Raise,
            num_threads: 1,
            prefetch: 1,
            blob_window: 8,
            blob_window_mb: 1,
        }
    }
}
