//! Diagnostics for sweep files: errors that stop a load and warnings that do not.
//!
//! Every diagnostic names its source (a file path, or `--command`), and where known the line,
//! column and parameter, so that `gridq expand` can print `file:line:column: parameter `lr`: ...`.

use std::fmt;

use super::yaml::Pos;

/// One message about a sweep file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the message is about, as the user named it, or `--command`.
    pub source: String,
    /// Where in the source, when known.
    pub pos: Option<Pos>,
    /// The parameter concerned, when there is one.
    pub param: Option<String>,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(pos) = self.pos {
            write!(f, ":{}:{}", pos.line, pos.col)?;
        }
        f.write_str(": ")?;
        if let Some(param) = &self.param {
            write!(f, "parameter `{param}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a sweep could not be loaded or expanded. Nothing here is worth retrying: the input must
/// change.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid sweep.
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

impl SweepError {
    /// The diagnostic, when the error is about the file's content.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            Self::Invalid(d) => Some(d),
            Self::Io { .. } => None,
        }
    }
}

/// The `Result` of this module.
pub type Result<T, E = SweepError> = std::result::Result<T, E>;

/// Builds diagnostics for one source.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    pub(crate) source: String,
}

impl Reporter {
    pub(crate) fn diag(
        &self,
        pos: Option<Pos>,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic {
            source: self.source.clone(),
            pos,
            param: param.map(str::to_owned),
            message: message.into(),
        }
    }

    pub(crate) fn error(
        &self,
        pos: Pos,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> SweepError {
        SweepError::Invalid(Box::new(self.diag(Some(pos), param, message)))
    }
}
