//! Types shared by every gridq component.
//!
//! # Layout
//! - [`ids`]: identifier newtypes (`JobId`, ...), so that ids are never bare strings.

pub mod ids;

pub use ids::{JobId, ParseIdError};
