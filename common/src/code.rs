//! The version of a project's code: what `gridq deploy` synced to a host (or what a local run
//! used), so that a job's result can name the exact code it ran.
//!
//! The deploy side computes it (`gridq_deploy::sync::code_version`) and writes it as JSON to
//! [`CODE_VERSION_FILE`] in the project directory, next to the job outputs; workers and the
//! master read it from there and carry it with what they report.

use serde::{Deserialize, Serialize};

/// Where a project directory holds its [`CodeVersion`] as JSON, relative to the project root.
/// It lies under `.gridq/`, which is never synced and never deleted by a sync.
pub const CODE_VERSION_FILE: &str = ".gridq/code.json";

/// The version of a project's code.
///
/// Later fields will come with `#[serde(default)]`, so an older file still reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CodeVersion {
    /// The content hash (BLAKE3, 64 lowercase hex digits) of exactly the files sent: their
    /// relative paths, permission bits, link targets and contents, in path order. Equal trees
    /// give equal hashes, whatever their modification times or git state.
    pub tree: String,
    /// The commit checked out (`git rev-parse HEAD`), when the project lies in a git work tree
    /// with at least one commit and git is installed.
    #[serde(default)]
    pub commit: Option<String>,
    /// Whether `git status` reports changes in the project directory (`.gridq`, `target` and
    /// `.git` aside), so that the tree may differ from `commit`; `None` outside a git work tree.
    #[serde(default)]
    pub dirty: Option<bool>,
}

impl CodeVersion {
    /// A short human form: the tree hash's first 12 digits, then the commit's first 12 when
    /// known, with `-dirty` after it when the work tree has changes (`3f2a…`,
    /// `3f2a… (git 9c1e…-dirty)`).
    pub fn short(&self) -> String {
        let tree = prefix(&self.tree, 12);
        match &self.commit {
            Some(commit) => format!(
                "{tree} (git {}{})",
                prefix(commit, 12),
                if self.dirty == Some(true) {
                    "-dirty"
                } else {
                    ""
                }
            ),
            None => tree.to_owned(),
        }
    }
}

/// The first `n` characters of `s` (all of it when shorter).
fn prefix(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_missing_optional_fields() {
        let v = CodeVersion {
            tree: "ab".repeat(32),
            commit: Some("c".repeat(40)),
            dirty: Some(false),
        };
        let json = serde_json::to_string(&v).expect("serialize");
        assert_eq!(
            serde_json::from_str::<CodeVersion>(&json).expect("parse"),
            v
        );
        let bare: CodeVersion = serde_json::from_str(r#"{"tree":"00"}"#).expect("parse");
        assert_eq!(
            bare,
            CodeVersion {
                tree: "00".to_owned(),
                commit: None,
                dirty: None
            }
        );
    }

    #[test]
    fn short_form() {
        let mut v = CodeVersion {
            tree: "0123456789abcdef".to_owned(),
            commit: None,
            dirty: None,
        };
        assert_eq!(v.short(), "0123456789ab");
        v.commit = Some("fedcba9876543210".to_owned());
        v.dirty = Some(false);
        assert_eq!(v.short(), "0123456789ab (git fedcba987654)");
        v.dirty = Some(true);
        assert_eq!(v.short(), "0123456789ab (git fedcba987654-dirty)");
    }
}
