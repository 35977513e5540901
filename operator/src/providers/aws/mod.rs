//! The `aws` kind: STS AssumeRole with a session policy per ApiKey, and revocation through
//! MinIO's `revoke-tokens` or an inline deny on the AWS role.

pub mod check;
pub mod mint;
pub mod revoke;
mod signed;

pub use check::sts_client;
