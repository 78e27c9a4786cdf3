//! The one error type of the native core. Every failure a user can cause becomes one of these, with a
//! message that says what is wrong and how to fix it; the Python glue turns it into `bleep_rs.BleepError`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arguments that cannot be used as given (shape, value, k, gene list, ...).
    #[error("{0}")]
    Invalid(String),
    /// A file that exists but is not a readable bleep-rs file (truncated, foreign, missing tensor).
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    pub fn format(path: &Path, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
