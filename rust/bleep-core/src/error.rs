//! The one error type of the native core. Every failure a user can cause becomes one of these, with a
//! message that says what is wrong and how to fix it; the Python binding turns it into `bleep_rs.BleepError`.

use std::path::Path;

/// Every failure of bleep-rs's native code: bad arguments, unreadable files, refused I/O.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arguments that cannot be used as given (shape, value, k, gene list, ...).
    #[error("{0}")]
    Invalid(String),
    /// A file that exists but is not a readable bleep-rs file (truncated, foreign, missing tensor).
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// The result of every fallible function of bleep-rs.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Invalid`] with this message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// An [`Error::Format`] about `path`.
    pub fn format(path: &Path, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] about `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
