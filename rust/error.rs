//! The crate's one error type. Every stage returns it; lib.rs turns it into a Python exception
//! (`impl From<Error> for PyErr`), so the message a user reads is this Display, whatever the stage.
//!
//! Variants say whose fault it is: the image bytes, a file, the prepared index, the caller's arguments,
//! or the machine. Only `Runtime` is not the data's fault; it becomes a RuntimeError, the rest ValueError.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Image text that is not base64 in either alphabet.
    BadBase64(String),
    /// Bytes in no format we read (JPEG, PNG, WebP, GIF).
    NotAnImage,
    /// A known format whose header is truncated or corrupt.
    BadHeader(String),
    /// A readable header whose pixels cannot be decoded or transformed.
    BadPixels(String),
    /// Encoded data that ends before the image does (complete.rs: a JPEG without its end-of-image marker, a
    /// WebP shorter than its RIFF size, ...). PIL refuses these ("image file is truncated"); so do we.
    Truncated(String),
    /// A header size whose long side is over limits::MAX_ASPECT_RATIO x its short side, or whose resize
    /// would have a side of 0.
    ExtremeAspect(String),
    /// A header size (or a resized intermediate) over the max_image_pixels limit.
    TooLarge(String),
    /// A table row whose image value is null.
    NullImage,
    /// A file (image table, JSON) that cannot be read where the index says; `cause` says how.
    File { file: String, cause: String },
    /// An image that failed, with where it lives: its file, the dataset of the sample using it, its id.
    Image {
        file: String,
        dataset: Option<String>,
        image_id: String,
        cause: Box<Error>,
    },
    /// The prepared index contradicts itself (found when a loader is built, before any batch).
    Index {
        file: String,
        /// (row, sample id) of the offending sample, when one is to blame.
        sample: Option<(usize, String)>,
        cause: String,
    },
    /// Arguments that cannot be honoured (a sample longer than the packing capacity, a bad rank, ...).
    Invalid(String),
    /// The machine, not the data: a thread that cannot start, or a bug in this crate.
    Runtime(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The per-image code `probe_images` reports to Python (data/prepare.py counts defects by it).
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadBase64(_) => "bad_base64",
            Error::NotAnImage => "not_an_image",
            Error::BadHeader(_) => "bad_header",
            Error::NullImage => "null_image",
            Error::Truncated(_) => "truncated_image",
            Error::ExtremeAspect(_) => "extreme_aspect_ratio",
            Error::TooLarge(_) => "image_too_large",
            _ => "error",
        }
    }

    /// The error of image row `image_id` in `file`, used by a sample of `dataset`.
    pub fn at_image(self, file: &str, dataset: Option<&str>, image_id: &str) -> Error {
        Error::Image {
            file: file.to_string(),
            dataset: dataset.map(str::to_string),
            image_id: image_id.to_string(),
            cause: Box::new(self),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadBase64(m) => write!(f, "unreadable base64: {m}"),
            Error::NotAnImage => f.write_str("bytes are not a JPEG, PNG, WebP or GIF image"),
            Error::BadHeader(m) => write!(f, "corrupt image header: {m}"),
            Error::BadPixels(m) => f.write_str(m),
            Error::Truncated(m) => write!(f, "truncated image: {m}"),
            Error::ExtremeAspect(m) => write!(f, "extreme aspect ratio: {m}"),
            Error::TooLarge(m) => write!(f, "image too large: {m}"),
            Error::NullImage => f.write_str("image bytes are null"),
            Error::File { file, cause } => write!(f, "{file}: {cause}"),
            Error::Image {
                file,
                dataset,
                image_id,
                cause,
            } => {
                write!(f, "{file}: ")?;
                if let Some(d) = dataset {
                    write!(f, "dataset {d}: ")?;
                }
                match cause.as_ref() {
                    // The file is already named: say what could not be read, not the path again.
                    Error::File { cause, .. } => {
                        write!(f, "image id '{image_id}': cannot read: {cause}")
                    }
                    other => write!(f, "image id '{image_id}': cannot decode: {other}"),
                }
            }
            Error::Index {
                file,
                sample,
                cause,
            } => match sample {
                Some((row, id)) => write!(f, "{file}: sample '{id}' (row {row}): {cause}"),
                None => write!(f, "{file}: {cause}"),
            },
            Error::Invalid(m) => f.write_str(m),
            Error::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Run `f`, turning a panic into the error `wrap(panic message)`. The last line of defence around code that
/// data reaches and we do not own (decoders, header readers, the parquet reader): a panic there would end
/// a whole epoch (or cross into Python as PanicException) where a per-image error can be skipped and names
/// the image. The panic's own message is kept as the cause.
pub fn catch_panic<T>(
    f: impl FnOnce() -> Result<T>,
    wrap: impl FnOnce(String) -> Error,
) -> Result<T> {
    quiet_hook_installed();
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    match r {
        Ok(r) => r,
        Err(payload) => Err(wrap(panic_message(payload.as_ref()))),
    }
}

thread_local! {
    /// Set while this thread runs inside `catch_panic`: its panics become errors, so the panic hook stays
    /// silent (a corrupt image would otherwise print a backtrace to stderr next to its one-line error).
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This extension's panic hook (each Rust extension module has its own): the default one, except inside
/// `catch_panic`.
fn quiet_hook_installed() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info);
            }
        }));
    });
}

/// The text of a panic payload (`panic!` with a message gives a &str or a String; libjpeg's unwinding
/// through the mozjpeg crate gives a String).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// `FromStr` for an option read from Python by name: `option_from_str!(Type, "what", "name" => Type::Variant, ...)`.
/// An unknown name is an `Error::Invalid` saying which names are accepted.
#[macro_export]
macro_rules! option_from_str {
    ($ty:ty, $what:literal, $($name:literal => $variant:expr),+ $(,)?) => {
        impl std::str::FromStr for $ty {
            type Err = $crate::error::Error;
            fn from_str(s: &str) -> $crate::error::Result<Self> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err($crate::error::Error::Invalid(format!(
                        "{} must be {}, not {s:?}",
                        $what,
                        [$(concat!("'", $name, "'")),+].join(" or ")
                    ))),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_file_dataset_and_id() {
        let e = Error::BadPixels("cannot decode Png: truncated".into()).at_image(
            "/d/img.parquet",
            Some("D"),
            "BAD",
        );
        assert_eq!(
            e.to_string(),
            "/d/img.parquet: dataset D: image id 'BAD': cannot decode: cannot decode Png: truncated"
        );
        let e = Error::File {
            file: "/d/img.parquet".into(),
            cause: "cannot open: gone".into(),
        }
        .at_image("/d/img.parquet", None, "X");
        assert_eq!(
            e.to_string(),
            "/d/img.parquet: image id 'X': cannot read: cannot open: gone"
        );
        let e = Error::Index {
            file: "IDX/samples.arrow".into(),
            sample: Some((3, "q7".into())),
            cause: "image row 99 out of range".into(),
        };
        assert_eq!(
            e.to_string(),
            "IDX/samples.arrow: sample 'q7' (row 3): image row 99 out of range"
        );
    }

    #[test]
    fn panics_become_errors_with_their_message() {
        let r: Result<()> = catch_panic(
            || panic!("index 7 out of range"),
            |m| Error::BadPixels(format!("decoder panicked: {m}")),
        );
        assert_eq!(
            r.unwrap_err(),
            Error::BadPixels("decoder panicked: index 7 out of range".into())
        );
        let r: Result<()> = catch_panic(
            || std::panic::resume_unwind(Box::new(String::from("libjpeg fatal error: x"))),
            Error::BadPixels,
        );
        assert_eq!(
            r.unwrap_err(),
            Error::BadPixels("libjpeg fatal error: x".into())
        );
        assert_eq!(catch_panic(|| Ok(3), Error::BadPixels), Ok(3));
    }

    #[test]
    fn probe_codes() {
        assert_eq!(Error::NotAnImage.code(), "not_an_image");
        assert_eq!(Error::BadBase64(String::new()).code(), "bad_base64");
        assert_eq!(Error::Invalid(String::new()).code(), "error");
        assert_eq!(
            Error::ExtremeAspect(String::new()).code(),
            "extreme_aspect_ratio"
        );
        assert_eq!(Error::TooLarge(String::new()).code(), "image_too_large");
        assert_eq!(Error::Truncated(String::new()).code(), "truncated_image");
    }
}
