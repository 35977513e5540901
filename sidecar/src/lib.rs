//! What the sidecar and the broker say to each other, defined once for both sides.

pub mod wire;
