//! One error type: every failure names the step it happened in and the path it concerns, so a
//! user sees one line that says what to fix.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{step}: {}: {source}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{step}: {}: {reason}", path.display())]
    Refused {
        step: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl JailError {
    pub fn refused(step: &'static str, path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        JailError::Refused {
            step,
            path: path.as_ref().to_owned(),
            reason: reason.into(),
        }
    }
}

/// `map_err(io_error("step", path))` for std and nix errors alike.
pub fn io_error<E: Into<io::Error>>(
    step: &'static str,
    path: impl AsRef<Path>,
) -> impl FnOnce(E) -> JailError {
    let path = path.as_ref().to_owned();
    move |e| JailError::Io {
        step,
        path,
        source: e.into(),
    }
}

pub type Result<T> = std::result::Result<T, JailError>;
