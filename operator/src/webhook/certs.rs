//! The webhook's serving certificate when the operator manages it itself (no cert-manager):
//! a private CA and a serving certificate kept in one Secret, the CA bundle patched into the
//! MutatingWebhookConfiguration, everything renewed before it expires.
//!
//! A CA rotation never breaks an admission. It goes in three steps, each written to the
//! Secret and applied only after the previous one had `propagation` to reach every replica
//! and the apiserver:
//! 1. stage: a new CA is created and trusted next to the old one (bundle = old + new);
//! 2. promote: the serving certificate is re-issued by the new CA (both still trusted);
//! 3. drop: the old CA leaves the bundle.
//!
//! Every replica runs the same loop; writes are optimistic (create, or replace at the read
//! resourceVersion), so when two race one wins and the other re-reads: they converge on the
//! Secret's content and serve the same certificate. Deciding the next step is pure
//! ([`next_step`]); generating keys and talking to the apiserver sit around it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tracing::{info, warn};

use crate::tls::MemoryCert;

/// Annotation on the Secret: when the current rotation step began (Unix seconds).
const STEP_ANNOTATION: &str = "keybroker.dev/step-started-at";
const CA_NAME: &str = "keybroker-webhook-ca";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading or writing Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("patching the caBundle of MutatingWebhookConfiguration {name}: {source}")]
    WebhookConfig { name: String, source: kube::Error },
    #[error("the generated serving certificate is unusable: {0}")]
    Unusable(#[from] crate::tls::PemError),
}

/// Where the certificate lives and how long things last.
#[derive(Clone, Debug)]
pub struct CertConfig {
    pub namespace: String,
    pub secret_name: String,
    /// The MutatingWebhookConfiguration whose webhooks get the CA bundle.
    pub webhook_config: String,
    /// DNS names (and IP addresses) the serving certificate is valid for.
    pub hosts: Vec<String>,
    pub timing: Timing,
}

/// Lifetimes, and the wait between rotation steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub ca_validity: Duration,
    pub cert_validity: Duration,
    /// How long a written step is left to reach every replica and the apiserver.
    pub propagation: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ca_validity: Duration::from_secs(5 * 365 * 24 * 3600),
            cert_validity: Duration::from_secs(90 * 24 * 3600),
            propagation: Duration::from_secs(60),
        }
    }
}

/// A PEM certificate, its key and its expiry. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: String,
    pub key: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pair")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What the Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    /// The CA that signs the serving certificate.
    pub ca: Pair,
    /// A staged CA, trusted but not yet signing.
    pub next_ca: Option<Pair>,
    pub serving: Pair,
    /// The PEM bundle the apiserver trusts.
    pub trust: String,
    /// When the current step began (Unix seconds).
    pub step_started: i64,
}

/// The next change to make to the Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing usable yet (or the CA already expired): a new CA and serving certificate.
    Create,
    /// The CA nears its end: trust a new one next to it.
    StageNextCa,
    /// The staged CA is trusted everywhere: sign the serving certificate with it.
    PromoteNextCa,
    /// Every replica serves the new certificate: stop trusting the old CA.
    DropOldCa,
    /// The serving certificate nears its end: re-issue it with the same CA.
    RenewServing,
}

/// Decides what to change, if anything. Renewals start when a third of a lifetime is left.
pub fn next_step(now: i64, material: Option<&Material>, timing: &Timing) -> Option<Step> {
    let Some(m) = material else {
        return Some(Step::Create);
    };
    if m.ca.not_after <= now || m.serving.not_after <= now {
        return Some(Step::Create);
    }
    let settled = now - m.step_started >= secs(timing.propagation);
    if m.next_ca.is_some() {
        return settled.then_some(Step::PromoteNextCa);
    }
    if m.trust.matches("BEGIN CERTIFICATE").count() > 1 {
        return settled.then_some(Step::DropOldCa);
    }
    if m.ca.not_after - now < secs(timing.ca_validity) / 3 {
        return Some(Step::StageNextCa);
    }
    if m.serving.not_after - now < secs(timing.cert_validity) / 3 {
        return Some(Step::RenewServing);
    }
    None
}

/// When [`next_step`] may next have something to do (the loop also re-reads on a timer).
fn next_check(now: i64, m: &Material, timing: &Timing) -> Duration {
    let candidates = [
        m.step_started + secs(timing.propagation),
        m.ca.not_after - secs(timing.ca_validity) / 3,
        m.serving.not_after - secs(timing.cert_validity) / 3,
    ];
    let soonest = candidates.into_iter().filter(|t| *t > now).min();
    let wait = soonest.map_or(1, |t| t - now);
    Duration::from_secs(u64::try_from(wait).unwrap_or(1))
}

/// Carries out `step` on `current` (keys are generated here).
pub fn apply(
    step: Step,
    now: i64,
    current: Option<Material>,
    hosts: &[String],
    timing: &Timing,
) -> Result<Material, Error> {
    let fresh = |now| -> Result<Material, Error> {
        let ca = new_ca(now, timing)?;
        let serving = new_serving(&ca, now, hosts, timing)?;
        Ok(Material {
            trust: ca.cert.clone(),
            ca,
            next_ca: None,
            serving,
            step_started: now,
        })
    };
    let Some(m) = current else {
        return fresh(now);
    };
    Ok(match step {
        Step::Create => fresh(now)?,
        Step::StageNextCa => {
            let next = new_ca(now, timing)?;
            Material {
                trust: format!("{}{}", m.ca.cert, next.cert),
                next_ca: Some(next),
                step_started: now,
                ..m
            }
        }
        Step::PromoteNextCa => match m.next_ca {
            Some(next) => Material {
                serving: new_serving(&next, now, hosts, timing)?,
                ca: next,
                next_ca: None,
                step_started: now,
                trust: m.trust,
            },
            None => m,
        },
        Step::DropOldCa => Material {
            trust: m.ca.cert.clone(),
            step_started: now,
            ..m
        },
        Step::RenewServing => Material {
            serving: new_serving(&m.ca, now, hosts, timing)?,
            ..m
        },
    })
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn offset(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn new_ca(now: i64, timing: &Timing) -> Result<Pair, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = distinguished_name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // A minute of slack for clocks that run slightly behind ours.
    params.not_before = offset(now - 60);
    let not_after = now + secs(timing.ca_validity);
    params.not_after = offset(not_after);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
    })
}

fn new_serving(ca: &Pair, now: i64, hosts: &[String], timing: &Timing) -> Result<Pair, Error> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.distinguished_name =
        distinguished_name(hosts.first().map_or("keybroker-webhook", String::as_str));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = offset(now - 60);
    // Never outlive the CA.
    let not_after = (now + secs(timing.cert_validity)).min(ca.not_after);
    params.not_after = offset(not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
    })
}

/// The Secret's data for `m`.
fn encode(m: &Material) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::from([
        ("ca.crt".to_owned(), m.ca.cert.clone()),
        ("ca.key".to_owned(), m.ca.key.clone()),
        ("tls.crt".to_owned(), m.serving.cert.clone()),
        ("tls.key".to_owned(), m.serving.key.clone()),
        ("ca-bundle.crt".to_owned(), m.trust.clone()),
    ]);
    if let Some(next) = &m.next_ca {
        data.insert("next-ca.crt".into(), next.cert.clone());
        data.insert("next-ca.key".into(), next.key.clone());
    }
    data.into_iter()
        .map(|(k, v)| (k, ByteString(v.into_bytes())))
        .collect()
}

/// The material in a Secret; `None` when anything is missing or unparsable (then it is
/// recreated rather than half-trusted).
fn decode(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let pair = |cert: &str, key: &str| -> Option<Pair> {
        let cert = text(cert)?;
        Some(Pair {
            not_after: not_after(&cert)?,
            key: text(key)?,
            cert,
        })
    };
    let next_ca = match data.contains_key("next-ca.crt") {
        true => Some(pair("next-ca.crt", "next-ca.key")?),
        false => None,
    };
    Some(Material {
        ca: pair("ca.crt", "ca.key")?,
        next_ca,
        serving: pair("tls.crt", "tls.key")?,
        trust: text("ca-bundle.crt")?,
        step_started: secret
            .metadata
            .annotations
            .as_ref()?
            .get(STEP_ANNOTATION)?
            .parse()
            .ok()?,
    })
}

/// The expiry (Unix seconds) of the first certificate in `pem`.
fn not_after(pem: &str) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, secs)
}

/// Keeps the Secret, this replica's serving certificate and the webhook configuration's CA
/// bundle current. Runs until dropped.
pub async fn run(client: Client, config: CertConfig, serving: Arc<MemoryCert>) {
    loop {
        let wait = match tick(&client, &config, &serving).await {
            Ok(wait) => wait,
            Err(e) => {
                warn!(error = %e, "webhook certificate upkeep failed; retrying");
                Duration::from_secs(2)
            }
        };
        // Re-read at least this often, so a step another replica wrote is picked up well
        // within the propagation time.
        let poll = (config.timing.propagation / 4)
            .clamp(Duration::from_millis(500), Duration::from_secs(30));
        tokio::time::sleep(wait.min(poll)).await;
    }
}

/// One pass: read, maybe advance one step, serve, publish the bundle. Returns how long to wait.
async fn tick(
    client: &Client,
    config: &CertConfig,
    serving: &MemoryCert,
) -> Result<Duration, Error> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &config.namespace);
    let secret_error = |source| Error::Secret {
        namespace: config.namespace.clone(),
        name: config.secret_name.clone(),
        source,
    };
    let secret = secrets
        .get_opt(&config.secret_name)
        .await
        .map_err(secret_error)?;
    let mut material = secret.as_ref().and_then(decode);
    let now = unix_now();
    if let Some(step) = next_step(now, material.as_ref(), &config.timing) {
        let next = apply(step, now, material.clone(), &config.hosts, &config.timing)?;
        let mut meta = ObjectMeta {
            name: Some(config.secret_name.clone()),
            namespace: Some(config.namespace.clone()),
            annotations: Some(BTreeMap::from([(
                STEP_ANNOTATION.to_owned(),
                next.step_started.to_string(),
            )])),
            ..ObjectMeta::default()
        };
        let body = |meta: ObjectMeta| Secret {
            metadata: meta,
            type_: Some("kubernetes.io/tls".into()),
            data: Some(encode(&next)),
            ..Secret::default()
        };
        let written = match &secret {
            None => secrets.create(&PostParams::default(), &body(meta)).await,
            Some(old) => {
                meta.resource_version = old.metadata.resource_version.clone();
                meta.labels = old.metadata.labels.clone();
                secrets
                    .replace(&config.secret_name, &PostParams::default(), &body(meta))
                    .await
            }
        };
        match written {
            Ok(_) => {
                info!(?step, secret = %config.secret_name, "advanced the webhook certificate");
                material = Some(next);
            }
            // Another replica wrote first: read what it wrote.
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(Duration::ZERO),
            Err(e) => return Err(secret_error(e)),
        }
    }
    let Some(material) = material else {
        return Ok(Duration::from_secs(1));
    };
    if serving.set(
        material.serving.cert.as_bytes(),
        material.serving.key.as_bytes(),
    )? {
        info!(
            not_after = material.serving.not_after,
            "serving a new webhook certificate"
        );
    }
    publish_bundle(client, &config.webhook_config, &material.trust).await?;
    Ok(next_check(unix_now(), &material, &config.timing))
}

/// Sets `caBundle` on every webhook of the configuration that does not have it yet.
async fn publish_bundle(client: &Client, name: &str, trust: &str) -> Result<(), Error> {
    let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let error = |source| Error::WebhookConfig {
        name: name.to_owned(),
        source,
    };
    let Some(current) = api.get_opt(name).await.map_err(error)? else {
        warn!(
            name,
            "MutatingWebhookConfiguration not found; the Helm chart creates it"
        );
        return Ok(());
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(trust);
    let mut ops = Vec::new();
    for (index, webhook) in current.webhooks.iter().flatten().enumerate() {
        if webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            != Some(trust.as_bytes())
        {
            // `test` pins the index to the webhook we looked at, in case the list changed.
            ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name}));
            ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": encoded}));
        }
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| error(kube::Error::SerdeError(e)))?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(error)?;
    info!(name, "published the webhook CA bundle");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        ca_validity: Duration::from_secs(3000),
        cert_validity: Duration::from_secs(900),
        propagation: Duration::from_secs(60),
    };

    /// Simulated time starts here (2027), where certificates are valid X.509 times.
    const BASE: i64 = 1_800_000_000;

    fn hosts() -> Vec<String> {
        vec![
            "keybroker-webhook.keybroker-system.svc".into(),
            "127.0.0.1".into(),
        ]
    }

    /// Runs the state machine from nothing over `until` seconds, one step at a time, and
    /// returns the steps taken with their times and every material seen.
    fn simulate(until: i64) -> Vec<(i64, Step, Material)> {
        let mut material: Option<Material> = None;
        let mut steps = Vec::new();
        for now in (BASE..BASE + until).step_by(10) {
            if let Some(step) = next_step(now, material.as_ref(), &T) {
                let next = apply(step, now, material.clone(), &hosts(), &T).unwrap();
                steps.push((now, step, next.clone()));
                material = Some(next);
            }
        }
        steps
    }

    #[test]
    fn rotation_goes_stage_promote_drop_with_propagation_between() {
        let steps = simulate(5000);
        let kinds: Vec<Step> = steps.iter().map(|(_, s, _)| *s).collect();
        // Create; serving renewals; then a full CA rotation (2000 s = 2/3 of 3000 s).
        assert_eq!(kinds[0], Step::Create);
        let stage = kinds.iter().position(|s| *s == Step::StageNextCa).unwrap();
        assert_eq!(kinds[stage + 1], Step::PromoteNextCa);
        assert_eq!(kinds[stage + 2], Step::DropOldCa);
        let (t_stage, t_promote, t_drop) = (steps[stage].0, steps[stage + 1].0, steps[stage + 2].0);
        assert_eq!(t_stage - BASE, 2010);
        assert!(t_promote - t_stage >= 60 && t_drop - t_promote >= 60);
        assert!(kinds.contains(&Step::RenewServing));
        assert!(!kinds[1..].contains(&Step::Create), "{kinds:?}");
    }

    /// Whether `serving` verifies against the CA bundle `trust` for the first host at `at`.
    fn verifies(serving: &str, trust: &str, at: i64) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(trust.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        let serving =
            rustls::pki_types::CertificateDer::from_pem_slice(serving.as_bytes()).unwrap();
        let name = rustls::pki_types::ServerName::try_from(hosts()[0].clone()).unwrap();
        let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(at as u64));
        verifier
            .verify_server_cert(&serving, &[], &name, &[], at)
            .is_ok()
    }

    #[test]
    fn every_step_keeps_old_and_new_certificates_trusted_by_old_and_new_bundles() {
        // During `propagation` after a step, a replica may serve either certificate and the
        // apiserver may use either bundle: all four combinations must verify.
        let steps = simulate(12000);
        assert!(
            steps
                .iter()
                .filter(|(_, s, _)| *s == Step::PromoteNextCa)
                .count()
                >= 3
        );
        for pair in steps.windows(2) {
            let ((_, _, before), (now, step, after)) = (&pair[0], &pair[1]);
            for serving in [&before.serving.cert, &after.serving.cert] {
                for trust in [&before.trust, &after.trust] {
                    assert!(
                        verifies(serving, trust, *now),
                        "{step:?} at {now} breaks trust"
                    );
                }
            }
        }
    }

    #[test]
    fn skipping_the_staging_would_break_trust() {
        // The check above can fail: a certificate from a CA the bundle lacks does not verify.
        let old = apply(Step::Create, BASE, None, &hosts(), &T).unwrap();
        let other = apply(Step::Create, BASE, None, &hosts(), &T).unwrap();
        assert!(verifies(&old.serving.cert, &old.trust, BASE + 10));
        assert!(!verifies(&other.serving.cert, &old.trust, BASE + 10));
    }

    #[test]
    fn a_generated_pair_is_servable() {
        let m = apply(Step::Create, unix_now(), None, &hosts(), &T).unwrap();
        crate::tls::certified_key(m.serving.cert.as_bytes(), m.serving.key.as_bytes()).unwrap();
        assert!(verifies(&m.serving.cert, &m.trust, unix_now()));
        assert!(m.serving.not_after <= m.ca.not_after);
    }

    #[test]
    fn the_secret_round_trips_and_damage_means_recreate() {
        let m = apply(Step::Create, 1_000, None, &hosts(), &T).unwrap();
        let m = apply(Step::StageNextCa, 1_100, Some(m), &hosts(), &T).unwrap();
        let secret = Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(STEP_ANNOTATION.into(), "1100".into())])),
                ..ObjectMeta::default()
            },
            data: Some(encode(&m)),
            ..Secret::default()
        };
        assert_eq!(decode(&secret), Some(m.clone()));
        let mut damaged = secret.clone();
        damaged
            .data
            .as_mut()
            .unwrap()
            .insert("tls.crt".into(), ByteString(b"garbage".to_vec()));
        assert_eq!(decode(&damaged), None);
        assert_eq!(next_step(1_200, None, &T), Some(Step::Create));
    }

    #[test]
    fn an_expired_ca_is_replaced_at_once() {
        let m = apply(Step::Create, 0, None, &hosts(), &T).unwrap();
        assert_eq!(next_step(3000, Some(&m), &T), Some(Step::Create));
        assert!(
            format!("{m:?}").contains("not_after") && !format!("{m:?}").contains("PRIVATE KEY")
        );
    }
}
