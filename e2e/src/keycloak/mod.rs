//! Keycloak as a real OAuth2 authorization server for the OAuth2 provider tests: a realm built
//! from typed parts (a confidential broker client that may exchange tokens, resource servers as
//! audiences, optional scopes, an introspecting client), imported at start, and the calls a
//! broker and a resource server make: client credentials, RFC 8693 token exchange, RFC 7662
//! introspection and RFC 7009 revocation.
//!
//! Keycloak runs in dev mode from the cached distribution (`e2e/tools/build.sh` built it for dev
//! mode once), with a home of its own per instance in the run directory (`-Dkc.home.dir`: its H2
//! database, the realm file to import) and only `lib/` shared with the cache. Its database is a
//! file there, so a stopped and restarted instance has the same realm, keys and clients.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::distr::{Alphanumeric, SampleString};

use crate::cluster::{free_ports, http_ok};
use crate::process::{Component, Lifetime};
use crate::tools::KeycloakTools;

mod oauth;
mod realm;

pub use oauth::{
    ACCESS_TOKEN_TYPE, Audience, CallError, Claims, Discovery, Introspection, OAuthError,
    TOKEN_EXCHANGE, Tokens, jwt_claims,
};
pub use realm::Realm;

/// How long Keycloak may take from spawn to serving the realm's discovery document (15-30 s
/// on 2 idle cores; a loaded machine doubles it).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM to SIGKILL: Keycloak stops in 1-3 s.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// The directory under the run directory that is the instance's Keycloak home.
const HOME: &str = "keycloak-home";

/// A Keycloak in dev mode on 127.0.0.1 with one imported realm. Dropping it stops the server;
/// [`Keycloak::stop`] and [`Keycloak::start`] stop it and bring it back on the same ports with
/// the same database.
pub struct Keycloak {
    realm: Realm,
    tools: KeycloakTools,
    dir: PathBuf,
    http_port: u16,
    management_port: u16,
    admin_user: String,
    admin_password: String,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    server: Option<Component>,
    /// PEM CAs Keycloak trusts for its outbound TLS (the apiserver's, for its keys).
    truststore: Option<PathBuf>,
}

impl fmt::Debug for Keycloak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keycloak")
            .field("url", &self.url())
            .field("realm", &self.realm)
            .field("admin_user", &self.admin_user)
            .field("admin_password", &"<redacted>")
            .field("dir", &self.dir)
            .field("running", &self.server.is_some())
            .finish()
    }
}

impl Keycloak {
    /// Starts Keycloak with `realm` imported, its home in `dir/keycloak-home` and its log in
    /// `dir/keycloak.log`, on free ports (HTTP and management), with a random bootstrap admin;
    /// returns once the realm's discovery document is served. `dir` should come from
    /// [`crate::run_dir`], so that the reaper finds Keycloak's processes by it.
    pub async fn start_in(dir: &Path, realm: &Realm) -> anyhow::Result<Self> {
        Self::start_in_trusting(dir, realm, None).await
    }

    /// [`Keycloak::start_in`], trusting the PEM CAs in `ca` for its own TLS calls (the
    /// apiserver's CA, for a realm trusting Kubernetes service-account tokens).
    pub async fn start_in_trusting(
        dir: &Path,
        realm: &Realm,
        ca: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let tools = KeycloakTools::locate()?;
        let home = dir.join(HOME);
        let import = home.join("data/import");
        std::fs::create_dir_all(&import)
            .with_context(|| format!("creating {}", import.display()))?;
        // Only the build (lib/quarkus) is shared: Keycloak reads it, and its check for a needed
        // rebuild, relative to its home.
        let lib = home.join("lib");
        std::os::unix::fs::symlink(tools.home.join("lib"), &lib)
            .with_context(|| format!("linking {}", lib.display()))?;
        let file = import.join(format!("{}-realm.json", realm.name()));
        let json = serde_json::to_vec_pretty(&realm.representation())?;
        write_private(&file, &json)?;
        let [http_port, management_port] = free_ports()?;
        // Not held across the start below: the thread's generator would make this future !Send.
        let (admin_user, admin_password) = {
            let mut rng = rand::rng();
            (
                format!(
                    "kb-admin-{}",
                    Alphanumeric.sample_string(&mut rng, 6).to_lowercase()
                ),
                Alphanumeric.sample_string(&mut rng, 32),
            )
        };
        let mut keycloak = Self {
            realm: realm.clone(),
            tools,
            dir: dir.to_owned(),
            http_port,
            management_port,
            admin_user,
            admin_password,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            server: None,
            truststore: ca.map(Path::to_owned),
        };
        keycloak.start().await?;
        Ok(keycloak)
    }

    /// Starts the server again after [`Keycloak::stop`], on the same ports and database.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.server.is_some() {
            bail!("Keycloak is already running");
        }
        let home = self.dir.join(HOME);
        let mut args = vec![
            "start-dev".to_owned(),
            "--http-host=127.0.0.1".to_owned(),
            format!("--http-port={}", self.http_port),
            format!("--http-management-port={}", self.management_port),
            "--import-realm".to_owned(),
            // kc.sh passes -D options to java after its own, so this home wins; it also puts
            // the run directory in java's command line, by which the reaper finds it.
            format!("-Dkc.home.dir={}", home.display()),
            // Never rebuild (it would write into the shared cache): run the cached build.
            "-Dkc.config.built=true".to_owned(),
        ];
        if let Some(ca) = &self.truststore {
            // A runtime option: Keycloak writes its truststore into this instance's home.
            args.push(format!("--truststore-paths={}", ca.display()));
        }
        let java_home = self.tools.java_home.display().to_string();
        let java = self.tools.java.display().to_string();
        let mut server = Component::spawn(
            "keycloak",
            &self.tools.home.join("bin/kc.sh"),
            &args,
            &[
                ("JAVA_HOME", &java_home),
                ("JAVA", &java),
                ("KC_BOOTSTRAP_ADMIN_USERNAME", &self.admin_user),
                ("KC_BOOTSTRAP_ADMIN_PASSWORD", &self.admin_password),
            ],
            &self.dir.join("keycloak.log"),
            Lifetime::TiedToProcess,
        )?;
        let probe = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let discovery = self.discovery_url();
        // Not ready: dropping `server` stops it.
        server
            .wait_ready("the realm's discovery document", READY_TIMEOUT, || {
                http_ok(&probe, &discovery, Some("\"issuer\""))
            })
            .await?;
        self.server = Some(server);
        Ok(())
    }

    /// Stops the server (SIGTERM to kc.sh, which passes it to java); its home stays. Returns
    /// how long it took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(mut server) = self.server.take() {
            server.stop(STOP_GRACE);
        }
        started.elapsed()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    pub fn realm(&self) -> &Realm {
        &self.realm
    }

    /// `http://127.0.0.1:<port>/realms/<realm>`, the tokens' `iss`.
    pub fn issuer(&self) -> String {
        format!("{}/realms/{}", self.url(), self.realm.name())
    }

    pub fn discovery_url(&self) -> String {
        discovery_url(&self.url(), self.realm.name())
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/protocol/openid-connect/token", self.issuer())
    }

    pub fn introspection_endpoint(&self) -> String {
        format!("{}/introspect", self.token_endpoint())
    }

    pub fn revocation_endpoint(&self) -> String {
        format!("{}/protocol/openid-connect/revoke", self.issuer())
    }

    /// The run directory (`keycloak.log`, `keycloak-home/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of Keycloak's log, for failure reports.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.dir.join("keycloak.log"), lines)
    }

    /// The java process (kc.sh's child) while the server runs.
    pub fn java_pid(&self) -> Option<u32> {
        let kc_sh = self.server.as_ref()?.pid();
        std::fs::read_to_string(format!("/proc/{kc_sh}/task/{kc_sh}/children"))
            .ok()?
            .split_whitespace()
            .find_map(|pid| pid.parse().ok())
    }

    /// Sends `signal` to kc.sh, as the kernel does when the test process dies.
    pub fn signal_launcher(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(server) = self.server.as_mut() {
            server.signal(signal);
        }
    }

    /// The realm's discovery document.
    pub async fn discovery(&self) -> anyhow::Result<Discovery> {
        let req = Request::get(self.discovery_url()).body(Full::new(Bytes::new()))?;
        let (status, body) = self.send(req).await?;
        if status != 200 {
            bail!(
                "GET {}: {status}: {}",
                self.discovery_url(),
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice(&body).context("the discovery document")
    }

    /// The bootstrap admin's name (random, like its password).
    pub fn admin_user(&self) -> &str {
        &self.admin_user
    }

    /// The bootstrap admin's password (given to Keycloak by environment, never on a command
    /// line).
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// An access token for the bootstrap admin (master realm, `admin-cli`, password grant).
    pub async fn admin_token(&self) -> Result<Tokens, CallError> {
        let url = format!("{}/realms/master/protocol/openid-connect/token", self.url());
        let form = form(&[
            ("grant_type", "password"),
            ("client_id", "admin-cli"),
            ("username", &self.admin_user),
            ("password", &self.admin_password),
        ]);
        self.post_form("the admin's password grant", &url, None, form)
            .await
    }

    /// Client credentials grant for `client` (client_secret_basic), with `scope` if given.
    pub async fn client_credentials(
        &self,
        client: &str,
        secret: &str,
        scope: Option<&str>,
    ) -> Result<Tokens, CallError> {
        let mut pairs = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope {
            pairs.push(("scope", scope));
        }
        self.post_form(
            "a client credentials grant",
            &self.token_endpoint(),
            Some((client, secret)),
            form(&pairs),
        )
        .await
    }

    /// RFC 8693 token exchange by `client` of access token `subject_token` for one addressed
    /// to `audience` (one `audience` parameter each; none when empty) with `scope` if given.
    pub async fn exchange(
        &self,
        client: &str,
        secret: &str,
        subject_token: &str,
        audience: &[&str],
        scope: Option<&str>,
    ) -> Result<Tokens, CallError> {
        let mut pairs = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", subject_token),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
        ];
        pairs.extend(audience.iter().map(|aud| ("audience", *aud)));
        if let Some(scope) = scope {
            pairs.push(("scope", scope));
        }
        self.post_form(
            "a token exchange",
            &self.token_endpoint(),
            Some((client, secret)),
            form(&pairs),
        )
        .await
    }

    /// RFC 7662 introspection of `token` by the realm's introspector client.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, CallError> {
        let introspector =
            self.realm
                .introspecting_client()
                .map_err(|source| CallError::Failed {
                    what: "an introspection",
                    source,
                })?;
        self.introspect_as(&introspector.id, &introspector.secret, token)
            .await
    }

    /// RFC 7662 introspection of `token` by `client` (a resource server sees only tokens
    /// addressed to it as active).
    pub async fn introspect_as(
        &self,
        client: &str,
        secret: &str,
        token: &str,
    ) -> Result<Introspection, CallError> {
        self.post_form(
            "an introspection",
            &self.introspection_endpoint(),
            Some((client, secret)),
            form(&[("token", token), ("token_type_hint", "access_token")]),
        )
        .await
    }

    /// RFC 7009 revocation of access token `token` by the client it was issued to (its `azp`).
    pub async fn revoke(&self, token: &str) -> Result<(), CallError> {
        let failed = |source| CallError::Failed {
            what: "a revocation",
            source,
        };
        let azp = jwt_claims(token)
            .map_err(failed)?
            .azp
            .ok_or_else(|| failed(anyhow::anyhow!("the token has no azp claim")))?;
        let client = self.realm.client(&azp).map_err(failed)?;
        self.revoke_as(&client.id, &client.secret, token).await
    }

    /// RFC 7009 revocation of `token` by `client`: Keycloak answers 200 with an empty body (also
    /// for a token it does not know, with an error body; see the tests).
    pub async fn revoke_as(
        &self,
        client: &str,
        secret: &str,
        token: &str,
    ) -> Result<(), CallError> {
        let what = "a revocation";
        let req = form_request(
            &self.revocation_endpoint(),
            Some((client, secret)),
            form(&[("token", token), ("token_type_hint", "access_token")]),
        )
        .map_err(|source| CallError::Failed { what, source })?;
        let (status, body) = self
            .send(req)
            .await
            .map_err(|source| CallError::Failed { what, source })?;
        if status == 200 {
            return Ok(());
        }
        Err(refusal(what, status, &body))
    }

    /// POSTs `form` to `url` and reads a `T` from a 200 answer.
    async fn post_form<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        url: &str,
        client: Option<(&str, &str)>,
        form: String,
    ) -> Result<T, CallError> {
        let failed = |source| CallError::Failed { what, source };
        let req = form_request(url, client, form).map_err(failed)?;
        let (status, body) = self.send(req).await.map_err(failed)?;
        if status != 200 {
            return Err(refusal(what, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| {
            failed(anyhow::anyhow!(
                "200 with an unexpected body ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
        let target = format!("{} {}", req.method(), req.uri().path());
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(req))
            .await
            .with_context(|| format!("{target} timed out after {REQUEST_TIMEOUT:?}"))?
            .with_context(|| target.clone())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| target.clone())?
            .to_bytes();
        Ok((status, body))
    }
}

fn discovery_url(url: &str, realm: &str) -> String {
    format!("{url}/realms/{realm}/.well-known/openid-configuration")
}

/// `application/x-www-form-urlencoded` pairs (a name may repeat).
fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A form POST, authenticated as `client` with HTTP basic auth (RFC 6749 §2.3.1: id and secret
/// form-encoded first).
fn form_request(
    url: &str,
    client: Option<(&str, &str)>,
    form: String,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json");
    if let Some((id, secret)) = client {
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let pair = STANDARD.encode(format!("{}:{}", encode(id), encode(secret)));
        req = req.header("authorization", format!("Basic {pair}"));
    }
    Ok(req.body(Full::new(Bytes::from(form)))?)
}

fn refusal(what: &'static str, status: u16, body: &[u8]) -> CallError {
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(error) => CallError::Refused {
            what,
            status,
            error,
        },
        Err(_) => CallError::Failed {
            what,
            source: anyhow::anyhow!("{status}: {}", String::from_utf8_lossy(body)),
        },
    }
}

/// Writes `contents` to `path`, readable by its owner only (the realm file holds the secrets).
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_repeat_names_and_encode_values() {
        assert_eq!(
            form(&[("audience", "a b"), ("audience", "c:d")]),
            "audience=a+b&audience=c%3Ad"
        );
    }
}
