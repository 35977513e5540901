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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::cluster::{free_ports, http_ok};
use crate::process::{Component, Lifetime};
use crate::tools::KeycloakTools;

/// How long Keycloak may take from spawn to serving the realm's discovery document (15-30 s
/// on 2 idle cores; a loaded machine doubles it).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM to SIGKILL: Keycloak stops in 1-3 s.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// RFC 8693's grant type.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693's token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

// ---------------------------------------------------------------------------------------------
// The realm

/// A realm to import: its clients with random secrets, its optional scopes and which resource
/// server (audience) each scope is for. `Debug` shows no secret.
#[derive(Clone)]
pub struct Realm {
    name: String,
    scopes: Vec<Scope>,
    clients: Vec<Client>,
}

/// An optional client scope a broker may request, put in tokens' `scope` claim
/// (`include.in.token.scope=true`), and the resource server it grants access to: a token with
/// the scope carries that client in its `aud` (`oidc-audience-mapper` on the scope).
#[derive(Clone, Debug)]
struct Scope {
    name: String,
    audience: String,
}

#[derive(Clone)]
struct Client {
    id: String,
    secret: String,
    kind: ClientKind,
}

#[derive(Clone, Debug, PartialEq)]
enum ClientKind {
    /// Confidential, with a service account (client credentials) and standard token exchange.
    Broker {
        access_token_lifespan: Duration,
        /// An `oidc-audience-mapper` on the client itself for every resource server, so that
        /// every token of this client carries all of them, whatever its scopes.
        every_audience: bool,
    },
    /// A resource server: an audience. It may introspect (only tokens addressed to it).
    ResourceServer,
    /// May introspect any token of the realm
    /// (`allow.token.introspection.without.audience.check=true`).
    Introspector,
}

impl fmt::Debug for Realm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Realm")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("clients", &self.clients)
            .finish()
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("kind", &self.kind)
            .finish()
    }
}

impl Realm {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            scopes: Vec::new(),
            clients: Vec::new(),
        }
    }

    /// A resource server `client_id` (a confidential client with no flow of its own) and the
    /// optional scopes that grant access to it, e.g. `("reports-api", &["reports:read"])`.
    pub fn resource_server(mut self, client_id: &str, scopes: &[&str]) -> Self {
        self.clients
            .push(Client::new(client_id, ClientKind::ResourceServer));
        self.scopes.extend(scopes.iter().map(|name| Scope {
            name: (*name).to_owned(),
            audience: client_id.to_owned(),
        }));
        self
    }

    /// The broker's client: confidential, client credentials (service account), standard token
    /// exchange, every scope of the realm optional, access tokens living `lifespan`.
    pub fn broker(mut self, client_id: &str, lifespan: Duration) -> Self {
        self.clients.push(Client::new(
            client_id,
            ClientKind::Broker {
                access_token_lifespan: lifespan,
                every_audience: false,
            },
        ));
        self
    }

    /// [`Realm::broker`] whose every token carries every resource server in `aud` (audience
    /// mappers on the client rather than on the scopes), as realms configured that way do.
    pub fn broker_with_every_audience(mut self, client_id: &str, lifespan: Duration) -> Self {
        self.clients.push(Client::new(
            client_id,
            ClientKind::Broker {
                access_token_lifespan: lifespan,
                every_audience: true,
            },
        ));
        self
    }

    /// A client that introspects any token of the realm (as a shared gateway would).
    pub fn introspector(mut self, client_id: &str) -> Self {
        self.clients
            .push(Client::new(client_id, ClientKind::Introspector));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret of client `client_id`.
    pub fn secret(&self, client_id: &str) -> anyhow::Result<&str> {
        self.client(client_id).map(|c| c.secret.as_str())
    }

    fn client(&self, client_id: &str) -> anyhow::Result<&Client> {
        self.clients
            .iter()
            .find(|c| c.id == client_id)
            .with_context(|| format!("realm {} has no client {client_id}", self.name))
    }

    fn introspecting_client(&self) -> anyhow::Result<&Client> {
        self.clients
            .iter()
            .find(|c| c.kind == ClientKind::Introspector)
            .with_context(|| format!("realm {} has no introspector client", self.name))
    }

    /// Keycloak's representation of the realm, as `--import-realm` reads it.
    fn representation(&self) -> RealmRepresentation {
        let resource_servers: Vec<&str> = self
            .clients
            .iter()
            .filter(|c| c.kind == ClientKind::ResourceServer)
            .map(|c| c.id.as_str())
            .collect();
        let mut client_scopes = vec![ClientScopeRepresentation::basic()];
        client_scopes.extend(self.scopes.iter().map(|scope| {
            ClientScopeRepresentation::optional(
                &scope.name,
                vec![ProtocolMapperRepresentation::audience(&scope.audience)],
            )
        }));
        let all_scopes: Vec<String> = self.scopes.iter().map(|s| s.name.clone()).collect();
        let clients = self
            .clients
            .iter()
            .map(|client| client.representation(&all_scopes, &resource_servers))
            .collect();
        RealmRepresentation {
            realm: self.name.clone(),
            enabled: true,
            client_scopes,
            default_default_client_scopes: vec![BASIC_SCOPE.to_owned()],
            default_optional_client_scopes: Vec::new(),
            clients,
        }
    }
}

impl Client {
    fn new(id: &str, kind: ClientKind) -> Self {
        Self {
            id: id.to_owned(),
            secret: Alphanumeric.sample_string(&mut rand::rng(), 32),
            kind,
        }
    }

    fn representation(&self, scopes: &[String], resource_servers: &[&str]) -> ClientRepresentation {
        let mut attributes = BTreeMap::new();
        let mut protocol_mappers = Vec::new();
        let mut optional_client_scopes = Vec::new();
        let mut service_accounts_enabled = false;
        match &self.kind {
            ClientKind::Broker {
                access_token_lifespan,
                every_audience,
            } => {
                service_accounts_enabled = true;
                attributes.insert("standard.token.exchange.enabled".into(), "true".into());
                attributes.insert(
                    "access.token.lifespan".into(),
                    access_token_lifespan.as_secs().to_string(),
                );
                optional_client_scopes = scopes.to_vec();
                if *every_audience {
                    protocol_mappers.extend(
                        resource_servers
                            .iter()
                            .map(|rs| ProtocolMapperRepresentation::audience(rs)),
                    );
                }
            }
            ClientKind::ResourceServer => {}
            ClientKind::Introspector => {
                attributes.insert(
                    "allow.token.introspection.without.audience.check".into(),
                    "true".into(),
                );
            }
        }
        ClientRepresentation {
            client_id: self.id.clone(),
            enabled: true,
            public_client: false,
            client_authenticator_type: "client-secret".into(),
            secret: self.secret.clone(),
            service_accounts_enabled,
            standard_flow_enabled: false,
            implicit_flow_enabled: false,
            direct_access_grants_enabled: false,
            attributes,
            protocol_mappers,
            default_client_scopes: vec![BASIC_SCOPE.to_owned()],
            optional_client_scopes,
        }
    }
}

/// The scope every client has by default: Keycloak's own `basic` (its `sub` claim). A realm
/// that lists its client scopes gets none of Keycloak's built-in ones, so it is defined here.
const BASIC_SCOPE: &str = "basic";

// Keycloak's import format (a subset of `RealmRepresentation` and its parts).

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RealmRepresentation {
    realm: String,
    enabled: bool,
    client_scopes: Vec<ClientScopeRepresentation>,
    default_default_client_scopes: Vec<String>,
    default_optional_client_scopes: Vec<String>,
    clients: Vec<ClientRepresentation>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientRepresentation {
    client_id: String,
    enabled: bool,
    public_client: bool,
    client_authenticator_type: String,
    secret: String,
    service_accounts_enabled: bool,
    standard_flow_enabled: bool,
    implicit_flow_enabled: bool,
    direct_access_grants_enabled: bool,
    attributes: BTreeMap<String, String>,
    protocol_mappers: Vec<ProtocolMapperRepresentation>,
    default_client_scopes: Vec<String>,
    optional_client_scopes: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientScopeRepresentation {
    name: String,
    protocol: String,
    attributes: BTreeMap<String, String>,
    protocol_mappers: Vec<ProtocolMapperRepresentation>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProtocolMapperRepresentation {
    name: String,
    protocol: String,
    protocol_mapper: String,
    consent_required: bool,
    config: BTreeMap<String, String>,
}

impl ClientScopeRepresentation {
    fn basic() -> Self {
        Self::new(
            BASIC_SCOPE,
            false,
            vec![ProtocolMapperRepresentation::new(
                "sub",
                "oidc-sub-mapper",
                &[
                    ("access.token.claim", "true"),
                    ("introspection.token.claim", "true"),
                ],
            )],
        )
    }

    fn optional(name: &str, protocol_mappers: Vec<ProtocolMapperRepresentation>) -> Self {
        Self::new(name, true, protocol_mappers)
    }

    fn new(
        name: &str,
        in_token_scope: bool,
        protocol_mappers: Vec<ProtocolMapperRepresentation>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            protocol: "openid-connect".into(),
            attributes: [
                ("include.in.token.scope", in_token_scope.to_string()),
                ("display.on.consent.screen", "false".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            protocol_mappers,
        }
    }
}

impl ProtocolMapperRepresentation {
    /// Puts client `audience` in the access token's (and the introspection's) `aud`.
    fn audience(audience: &str) -> Self {
        Self::new(
            &format!("audience {audience}"),
            "oidc-audience-mapper",
            &[
                ("included.client.audience", audience),
                ("access.token.claim", "true"),
                ("introspection.token.claim", "true"),
                ("id.token.claim", "false"),
            ],
        )
    }

    fn new(name: &str, mapper: &str, config: &[(&str, &str)]) -> Self {
        Self {
            name: name.to_owned(),
            protocol: "openid-connect".into(),
            protocol_mapper: mapper.to_owned(),
            consent_required: false,
            config: config
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What Keycloak answers

/// The realm's OpenID discovery document (the fields the tests use).
#[derive(Clone, Debug, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub token_endpoint: String,
    pub introspection_endpoint: String,
    pub revocation_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub grant_types_supported: Vec<String>,
}

/// A token endpoint's answer. `Debug` shows no token.
#[derive(Clone, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    /// Space-separated; Keycloak sends `""` for a token with none of the optional scopes.
    #[serde(default)]
    pub scope: Option<String>,
    /// Set on token exchange answers.
    #[serde(default)]
    pub issued_token_type: Option<String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("issued_token_type", &self.issued_token_type)
            .finish()
    }
}

impl Tokens {
    /// The access token's claims (its payload, decoded without checking the signature).
    pub fn claims(&self) -> anyhow::Result<Claims> {
        jwt_claims(&self.access_token)
    }
}

/// `aud` as Keycloak writes it: a string for one audience, an array for several.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    /// The audiences, sorted.
    pub fn sorted(&self) -> Vec<&str> {
        let mut all: Vec<&str> = match self {
            Self::One(one) => vec![one.as_str()],
            Self::Many(many) => many.iter().map(String::as_str).collect(),
        };
        all.sort_unstable();
        all
    }
}

/// An access token's claims (or an introspection's), the ones the tests look at by name and
/// the rest in `other`.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub aud: Option<Audience>,
    #[serde(default)]
    pub azp: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub jti: Option<String>,
    #[serde(default)]
    pub sid: Option<String>,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// An RFC 7662 introspection answer.
#[derive(Clone, Debug, Deserialize)]
pub struct Introspection {
    pub active: bool,
    #[serde(flatten)]
    pub claims: Claims,
}

/// The payload of JWT `token`, decoded without checking its signature.
pub fn jwt_claims(token: &str) -> anyhow::Result<Claims> {
    let payload = token
        .split('.')
        .nth(1)
        .context("the token is not a JWT (no payload part)")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .context("the token's payload is not base64url")?;
    serde_json::from_slice(&bytes).context("the token's payload is not a JSON object")
}

/// An OAuth2 error answer (RFC 6749 §5.2).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct OAuthError {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error_description {
            Some(description) => write!(f, "{}: {description}", self.error),
            None => f.write_str(&self.error),
        }
    }
}

/// A call to Keycloak that did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Keycloak answered with an OAuth2 error.
    #[error("Keycloak refused {what} with {status}: {error}")]
    Refused {
        what: &'static str,
        status: u16,
        error: OAuthError,
    },
    /// No answer, or one that is neither the expected one nor an OAuth2 error.
    #[error("{what}: {source:#}")]
    Failed {
        what: &'static str,
        source: anyhow::Error,
    },
}

impl CallError {
    /// The status and OAuth2 error of a refusal.
    pub fn refusal(&self) -> Option<(u16, &OAuthError)> {
        match self {
            Self::Refused { status, error, .. } => Some((*status, error)),
            Self::Failed { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server

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
        let file = import.join(format!("{}-realm.json", realm.name));
        let json = serde_json::to_vec_pretty(&realm.representation())?;
        write_private(&file, &json)?;
        let [http_port, management_port] = free_ports()?;
        let mut rng = rand::rng();
        let mut keycloak = Self {
            realm: realm.clone(),
            tools,
            dir: dir.to_owned(),
            http_port,
            management_port,
            admin_user: format!(
                "kb-admin-{}",
                Alphanumeric.sample_string(&mut rng, 6).to_lowercase()
            ),
            admin_password: Alphanumeric.sample_string(&mut rng, 32),
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            server: None,
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
        let args = vec![
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
        format!("{}/realms/{}", self.url(), self.realm.name)
    }

    pub fn discovery_url(&self) -> String {
        discovery_url(&self.url(), &self.realm.name)
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

    fn realm() -> Realm {
        Realm::new("kb")
            .resource_server("reports-api", &["reports:read", "reports:write"])
            .resource_server("billing-api", &["billing:read"])
            .broker("keybroker", Duration::from_secs(5))
            .broker_with_every_audience("keybroker-wide", Duration::from_secs(300))
            .introspector("introspector")
    }

    #[test]
    fn the_realm_has_what_keycloak_needs_and_debug_shows_no_secret() {
        let realm = realm();
        let json = serde_json::to_value(realm.representation()).unwrap();
        let clients = json["clients"].as_array().unwrap();
        let client = |id: &str| {
            clients
                .iter()
                .find(|c| c["clientId"] == id)
                .unwrap_or_else(|| panic!("no client {id} in {json}"))
        };
        let broker = client("keybroker");
        assert_eq!(broker["serviceAccountsEnabled"], true);
        assert_eq!(broker["publicClient"], false);
        assert_eq!(broker["secret"], realm.secret("keybroker").unwrap());
        assert_eq!(
            broker["attributes"]["standard.token.exchange.enabled"],
            "true"
        );
        assert_eq!(broker["attributes"]["access.token.lifespan"], "5");
        assert_eq!(
            broker["optionalClientScopes"],
            serde_json::json!(["reports:read", "reports:write", "billing:read"])
        );
        assert_eq!(broker["protocolMappers"], serde_json::json!([]));
        let wide = client("keybroker-wide");
        let audiences: Vec<_> = wide["protocolMappers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["config"]["included.client.audience"].clone())
            .collect();
        assert_eq!(audiences, ["reports-api", "billing-api"]);
        assert_eq!(
            client("introspector")["attributes"]["allow.token.introspection.without.audience.check"],
            "true"
        );
        assert_eq!(client("reports-api")["serviceAccountsEnabled"], false);

        let scopes = json["clientScopes"].as_array().unwrap();
        let scope = |name: &str| scopes.iter().find(|s| s["name"] == name).unwrap();
        assert_eq!(
            scope("reports:write")["attributes"]["include.in.token.scope"],
            "true"
        );
        let mapper = &scope("billing:read")["protocolMappers"][0];
        assert_eq!(mapper["protocolMapper"], "oidc-audience-mapper");
        assert_eq!(mapper["config"]["included.client.audience"], "billing-api");
        assert_eq!(
            scope("basic")["protocolMappers"][0]["protocolMapper"],
            "oidc-sub-mapper"
        );
        assert_eq!(
            json["defaultDefaultClientScopes"],
            serde_json::json!(["basic"])
        );

        let shown = format!("{realm:?}");
        for id in ["keybroker", "keybroker-wide", "introspector", "reports-api"] {
            let secret = realm.secret(id).unwrap();
            assert_eq!(secret.len(), 32);
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_ne!(
            realm.secret("keybroker").unwrap(),
            realm.secret("introspector").unwrap()
        );
        assert!(realm.secret("nobody").is_err());
    }

    #[test]
    fn jwt_claims_read_a_payload_and_aud_keeps_its_shape() {
        let payload = URL_SAFE_NO_PAD.encode(
            br#"{"aud":"reports-api","scope":"reports:read","jti":"trrtte:1","azp":"kb","exp":2}"#,
        );
        let claims = jwt_claims(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(claims.aud, Some(Audience::One("reports-api".into())));
        assert_eq!(claims.scope.as_deref(), Some("reports:read"));
        assert_eq!(claims.exp, Some(2));
        let many = URL_SAFE_NO_PAD.encode(br#"{"aud":["b","a"],"typ":"Bearer"}"#);
        let claims = jwt_claims(&format!("e30.{many}.sig")).unwrap();
        assert_eq!(
            claims.aud.as_ref().map(Audience::sorted),
            Some(vec!["a", "b"])
        );
        assert_eq!(claims.other["typ"], "Bearer");
        assert!(jwt_claims("not-a-jwt").is_err());
    }

    #[test]
    fn tokens_debug_shows_no_token_and_forms_repeat_names() {
        let tokens = Tokens {
            access_token: "eyJsecret".into(),
            token_type: "Bearer".into(),
            expires_in: 5,
            scope: None,
            issued_token_type: None,
        };
        assert!(!format!("{tokens:?}").contains("eyJsecret"));
        assert_eq!(
            form(&[("audience", "a b"), ("audience", "c:d")]),
            "audience=a+b&audience=c%3Ad"
        );
    }
}
