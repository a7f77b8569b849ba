//! The gridq worker, as a library: it consumes jobs from RabbitMQ, claims them from the master,
//! runs them as subprocesses and reports output, results and heartbeats.
//!
//! # Layout
//! - [`agent`]: the worker service: sessions, the outbox, heartbeats, graceful stop.
//! - [`code_version`]: which version of the project's code a job runs (`.gridq/code.json`).
//! - [`feeder`]: deliveries, claims and grants, how many jobs a worker holds, starting jobs on
//!   free slots.
//! - [`job_env`]: what a job inherits from the worker's environment, and what it never sees.
//! - [`outputs`]: a job's output directory (`GRIDQ_OUTPUT`) and the list of what it left there.
//! - [`parent`]: exits with the process that started the worker (`--exit-with-parent-fd`).
//! - [`runner`]: runs one job as a subprocess (process group, timeout, kill, output lines, result).
//! - [`scratch`]: the private directory where jobs leave their result files.
//! - [`spawn`]: starts a job's process (`clone`, parent-death signal, another user).

pub mod agent;
pub mod code_version;
pub mod feeder;
pub mod job_env;
pub mod outputs;
pub mod parent;
pub mod runner;
pub mod scratch;
pub mod spawn;
