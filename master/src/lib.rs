//! The gridq master, as a library.
//!
//! # Layout
//! - [`sweep`]: the sweep language. A YAML file is loaded into a validated [`sweep::Sweep`],
//!   which expands lazily into [`sweep::Job`]s with stable content-addressed ids.

pub mod sweep;
