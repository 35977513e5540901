//! Throwaway PKI for one control plane: a CA, serving and client certificates, and the
//! service-account signing key. Everything is generated at run time and never committed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A PEM certificate and key written to disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that signs the control plane's certificates.
#[derive(Debug)]
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert: PathBuf,
}

impl Ca {
    /// Creates a CA named `common_name` and writes its certificate to `dir/ca.crt`.
    pub fn create(dir: &Path, common_name: &str) -> Result<Self, Error> {
        let gen_err = |source| Error::Generate {
            what: format!("CA {common_name}"),
            source,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.distinguished_name = name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(gen_err)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(gen_err)?;
        let cert = dir.join("ca.crt");
        write(&cert, issuer.pem().as_bytes(), 0o644)?;
        Ok(Self { issuer, cert })
    }

    /// Issues a serving certificate for `sans` (IP addresses and DNS names) as `dir/<file>.crt/.key`.
    pub fn issue_server(&self, dir: &Path, file: &str, sans: &[&str]) -> Result<CertFiles, Error> {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        self.issue(
            dir,
            file,
            sans,
            file,
            &[],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// Issues a client certificate for user `common_name` in groups `organizations`.
    pub fn issue_client(
        &self,
        dir: &Path,
        file: &str,
        common_name: &str,
        organizations: &[&str],
    ) -> Result<CertFiles, Error> {
        self.issue(
            dir,
            file,
            Vec::new(),
            common_name,
            organizations,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(
        &self,
        dir: &Path,
        file: &str,
        sans: Vec<String>,
        common_name: &str,
        organizations: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles, Error> {
        let gen_err = |source| Error::Generate {
            what: format!("certificate {file}"),
            source,
        };
        let mut params = CertificateParams::new(sans).map_err(gen_err)?;
        params.distinguished_name = name(common_name, organizations);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let files = CertFiles {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
        };
        write(&files.cert, cert.pem().as_bytes(), 0o644)?;
        write(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        Ok(files)
    }
}

/// Writes a fresh ECDSA P-256 signing key: the private key (PKCS#8 PEM) to `private` and its
/// public key to `public` (the apiserver's `--service-account-key-file` wants the public half).
pub fn write_signing_key(private: &Path, public: &Path) -> Result<(), Error> {
    let key = KeyPair::generate().map_err(|source| Error::Generate {
        what: "service-account signing key".into(),
        source,
    })?;
    write(private, key.serialize_pem().as_bytes(), 0o600)?;
    write(public, key.public_key_pem().as_bytes(), 0o644)
}

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    for org in organizations {
        dn.push(DnType::OrganizationName, *org);
    }
    dn
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })
}
