//! The gridq worker, as a library: it consumes jobs from RabbitMQ, claims them from the master,
//! runs them as subprocesses and reports output, results and heartbeats.
//!
//! # Layout
//! - [`agent`]: the worker service: slots, the claim/grant protocol, the outbox, heartbeats,
//!   graceful stop.
//! - [`runner`]: runs one job as a subprocess (process group, timeout, kill, output lines, result).

pub mod agent;
pub mod runner;
