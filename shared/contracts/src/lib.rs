//! The contracts between devfleet services that are carried by the store
//! rather than by messages: records one service writes and another reads,
//! and the pure rules both sides must agree on.
//!
//! * [`capacity`]: dev-workers publish their free slots; the scheduler's
//!   dispatcher hands out only as much work as they can take.
//! * [`capabilities`]: what workers can run and what work requires.
//! * [`breaker`]: the router's circuit breakers per stage, and how a
//!   dispatcher asks whether it may dispatch.
//! * [`integration`]: the shards of a plan's integration steps and the
//!   tally of their results.
//!
//! Services depend on this crate, never on each other: a contract that two
//! services share lives here (or in `devfleet-protocol` when it travels as
//! a message). This crate does no I/O of its own beyond the store calls
//! its functions make through [`devfleet_store::TaskStore`].

pub mod breaker;
pub mod capabilities;
pub mod capacity;
pub mod integration;
