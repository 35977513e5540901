//! Provider kinds behind one seam: each kind verifies the broker's identity (KeyProvider
//! `Ready`), mints credentials for a grant, and revokes what it minted. Today there is one
//! kind, `aws` (STS-compatible: AWS, MinIO, Ceph RGW); the controller and the broker reach a
//! provider only through this module.

pub mod aws;
