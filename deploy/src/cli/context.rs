//! The saved CLI context: which master the commands talk to, and its token.
//!
//! `gridq master` (and `gridq run --local`) save `{url, token}`, and `gridq deploy` saves
//! `{cluster}` (the cluster file: commands then reach its master through an SSH tunnel), to
//! `$GRIDQ_CONTEXT`, or `$XDG_CONFIG_HOME/gridq/context.json`, or
//! `~/.config/gridq/context.json`, with mode 0600. `--master`/`GRIDQ_MASTER` and
//! `--token`/`GRIDQ_TOKEN` take precedence.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Saved {
    #[serde(default)]
    pub(crate) url: String,
    #[serde(default)]
    pub(crate) token: String,
    /// A deployed cluster's file, absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cluster: Option<PathBuf>,
}

fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GRIDQ_CONTEXT") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("gridq").join("context.json"))
}

pub(crate) fn save(url: &str, token: &str) -> anyhow::Result<()> {
    write(&Saved {
        url: url.to_owned(),
        token: token.to_owned(),
        cluster: None,
    })
}

/// Saves a deployed cluster as the context.
pub(crate) fn save_cluster(cluster_file: &std::path::Path) -> anyhow::Result<()> {
    write(&Saved {
        url: String::new(),
        token: String::new(),
        cluster: Some(cluster_file.to_path_buf()),
    })
}

fn write(saved: &Saved) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(path) = path() else { return Ok(()) };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(saved)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub(crate) fn load() -> Option<Saved> {
    let text = std::fs::read_to_string(path()?).ok()?;
    serde_json::from_str(&text).ok()
}
