//! The operator side of gridq: the `gridq` command line (and, later, cluster deployment).
//!
//! # Layout
//! - [`cli`]: argument parsing and one small function per subcommand, each calling into the
//!   component libraries (`gridq_master`, `gridq_worker`).

pub mod cli;
