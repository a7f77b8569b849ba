//! Types shared by every gridq component.
//!
//! # Layout
//! - [`ids`]: identifier newtypes (`JobId`, `SweepId`, `WorkerId`), never bare strings.
//! - [`code`]: the version of the project's code an attempt ran ([`code::CodeVersion`]).
//! - [`wire`]: the messages that cross the broker, with their schema and kind headers.
//! - [`topology`]: the AMQP exchanges and queues, declared in one place.
//! - [`amqp`]: connecting to the broker, with redacted URLs and reconnection backoff.
//! - [`secret`]: secrets masked in what a job prints before it is forwarded or stored.
//! - [`management`]: RabbitMQ's management API: vhosts, users, permissions.
//! - [`rabbit_node`]: a private RabbitMQ node that gridq starts itself (local mode, tests).

pub mod amqp;
pub mod code;
pub mod human;
pub mod ids;
pub mod management;
pub mod rabbit_node;
pub mod secret;
pub mod topology;
pub mod wire;

pub use ids::{InvalidName, JobId, ParseIdError, SweepId, WorkerId};
