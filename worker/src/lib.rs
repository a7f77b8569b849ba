//! The gridq worker, as a library: it will consume jobs from RabbitMQ, run them as subprocesses
//! and report output, results and heartbeats (issue: the job pipeline).
//!
//! # Layout
//! Nothing yet beyond the crate itself: the sweep language comes first.
