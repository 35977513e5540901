//! The `gateway` kind: the broker holds an upstream's long-lived key and the pods call the
//! upstream through keybroker's gateway, which checks every call against the ApiKey (methods,
//! paths, size, budget, revocation) and adds the key. Nothing to revoke at the upstream: the
//! gateway refuses a withdrawn ApiKey's next call.

pub mod check;
pub mod forward;
pub mod rotation;
pub mod scope;
pub mod session;

/// What revoking does with a gateway provider (the KeyProvider's status).
pub const REVOCATION: &str =
    "the gateway refuses a withdrawn ApiKey's next call; the upstream's key never left the broker";

/// Data key of the key Secret holding the current key.
pub const KEY: &str = "key";
/// Data key of the key Secret holding the previous key during a rotation.
pub const PREVIOUS_KEY: &str = "previousKey";
