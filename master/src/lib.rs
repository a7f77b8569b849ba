//! The gridq master, as a library.
//!
//! # Layout
//! - [`sweep`]: the sweep language. A YAML file is loaded into a validated [`sweep::Sweep`],
//!   which expands lazily into [`sweep::Job`]s with stable content-addressed ids.
//! - [`store`]: the embedded SQLite store of sweeps, jobs, attempts, results, logs, workers.
//! - [`broker`]: the AMQP session (consumers, confirmed publishing, dead letters).
//! - [`broker_stats`]: queue depths from the management API, or passive declares over AMQP.
//! - [`service`]: the core loop, the lease protocol, and [`service::start`].
//! - [`state_dir`]: the state directory, private to the master's user.
//! - [`http`]: the JSON API under `/api/v1`.

pub mod broker;
pub mod broker_stats;
pub mod http;
pub mod service;
pub mod state_dir;
pub mod store;
pub mod submit;
pub mod sweep;
