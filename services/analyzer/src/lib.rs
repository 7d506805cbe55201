//! The analyzer service: consumes `plans.submitted`, analyzes each plan
//! with the [`devfleet_analysis`] library (imports → DAG, cycles, batches,
//! critical path, priorities) and publishes `plans.analyzed`.
//!
//! The analysis itself lives in the shared `devfleet-analysis` crate so the
//! CLI (`devfleet analyze`) and other services (agent context) use the same
//! scanners and resolution rules; this crate only owns the service loop.

pub mod service;

pub use service::{run, Config};
