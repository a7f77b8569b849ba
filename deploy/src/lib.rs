//! The operator side of gridq: the `gridq` command line and cluster deployment over SSH and
//! Docker.
//!
//! # Layout
//! - [`cli`]: argument parsing and one small function per subcommand, each calling into the
//!   component libraries (`gridq_master`, `gridq_worker`) and the modules below.
//! - [`hosts`]: mlframework-style host lists (`-a [user@]host[:port],...`).
//! - [`ssh`]: parallel SSH sessions to those hosts, argv commands, actionable errors.
//! - [`sync`]: the project, copied incrementally to a host (rsync, or a tar stream).
//! - [`docker`]: a host's Docker engine through bollard, over SSH (`docker system dial-stdio`),
//!   and images handed from one engine to another without a registry.
//! - [`cluster`]: the cluster file and `deploy`, `status`, `update`, `clean` built on these.
//! - [`tunnel`]: SSH port forwards to a host's loopback (the monitor).

pub mod cli;
pub mod cluster;
pub mod docker;
pub mod hosts;
pub mod pki;
pub mod ssh;
pub mod sync;
pub mod tunnel;
