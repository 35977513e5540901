//! The targets, one module per component: what each one feeds in and what it checks.

pub mod admission;
pub mod exchange;
pub mod policy;
pub mod sidecar;
