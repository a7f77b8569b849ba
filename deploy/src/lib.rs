//! The operator side of gridq: the `gridq` command line (and, later, cluster deployment).
//!
//! # Layout
//! - [`cli`]: argument parsing and one small function per subcommand, each calling into the
//!   component libraries (`gridq_master`, `gridq_worker`).
//! - [`hosts`]: mlframework-style host lists (`-a [user@]host[:port],...`).
//! - [`ssh`]: parallel SSH sessions to those hosts, argv commands, actionable errors.

pub mod cli;
pub mod hosts;
pub mod ssh;
