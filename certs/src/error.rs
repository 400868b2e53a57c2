//! The one error type for generating, parsing and writing certificates.

use std::path::PathBuf;

/// Why a certificate could not be generated, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A setting is unusable (an empty service name, a renewal window longer than the
    /// validity, ...). The message names the setting.
    #[error("invalid certificate setting: {0}")]
    Invalid(String),
    /// rcgen refused to build or sign a certificate.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM or DER input that is not a certificate or key this crate can use.
    #[error("cannot parse {what}: {message}")]
    Parse {
        /// What was being parsed (`ca.crt`, `CA key`, ...).
        what: String,
        /// What is wrong with it.
        message: String,
    },
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Rendering the Secret manifest failed.
    #[error("cannot render Secret manifest: {0}")]
    Render(String),
}

impl CertError {
    pub(crate) fn parse(what: impl Into<String>, message: impl ToString) -> Self {
        Self::Parse {
            what: what.into(),
            message: message.to_string(),
        }
    }
}
