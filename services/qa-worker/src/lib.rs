//! Placeholder until this service is built.
