//! The realm a [`super::Keycloak`] imports, built from typed parts and written in Keycloak's
//! import format (a subset of its `RealmRepresentation`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;

/// A realm to import: its clients with random secrets, its optional scopes and which resource
/// server (audience) each scope is for. `Debug` shows no secret.
#[derive(Clone)]
pub struct Realm {
    name: String,
    scopes: Vec<Scope>,
    clients: Vec<Client>,
    /// The Kubernetes service-account issuer the realm trusts for client assertions.
    kubernetes_issuer: Option<String>,
}

/// The alias of the realm's Kubernetes identity provider (clients name it in
/// `jwt.credential.issuer`).
const KUBERNETES_IDP: &str = "kubernetes";

/// An optional client scope a broker may request, put in tokens' `scope` claim
/// (`include.in.token.scope=true`), and the resource server it grants access to: a token with
/// the scope carries that client in its `aud` (`oidc-audience-mapper` on the scope).
#[derive(Clone, Debug)]
struct Scope {
    name: String,
    audience: String,
}

#[derive(Clone)]
pub(super) struct Client {
    pub(super) id: String,
    pub(super) secret: String,
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
        /// Scopes every token of this client carries (default client scopes), asked for or not.
        default_scopes: Vec<String>,
        /// Authenticated by a token of this Kubernetes service account
        /// (`system:serviceaccount:<ns>:<name>`) instead of its secret.
        service_account: Option<String>,
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
            .field("kubernetes_issuer", &self.kubernetes_issuer)
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
            kubernetes_issuer: None,
        }
    }

    /// Trusts tokens of the Kubernetes service-account issuer `issuer` (the apiserver's URL:
    /// Keycloak reads its discovery document and keys) as client assertions. Keycloak must
    /// trust the apiserver's CA ([`super::Keycloak::start_in_trusting`]).
    pub fn trusting_kubernetes(mut self, issuer: &str) -> Self {
        self.kubernetes_issuer = Some(issuer.to_owned());
        self
    }

    /// [`Realm::broker`] authenticated by a token of service account `namespace/name` (an RFC
    /// 7523 client assertion) instead of a secret; needs [`Realm::trusting_kubernetes`].
    pub fn broker_by_service_account(
        self,
        client_id: &str,
        lifespan: Duration,
        (namespace, name): (&str, &str),
    ) -> Self {
        let subject = format!("system:serviceaccount:{namespace}:{name}");
        self.with_broker(client_id, lifespan, false, Vec::new(), Some(subject))
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
    pub fn broker(self, client_id: &str, lifespan: Duration) -> Self {
        self.with_broker(client_id, lifespan, false, Vec::new(), None)
    }

    /// [`Realm::broker`] whose every token carries every resource server in `aud` (audience
    /// mappers on the client rather than on the scopes), as realms configured that way do.
    pub fn broker_with_every_audience(self, client_id: &str, lifespan: Duration) -> Self {
        self.with_broker(client_id, lifespan, true, Vec::new(), None)
    }

    /// [`Realm::broker`] whose every token carries `scope` (a default client scope of the
    /// client, as realms that give a client some scopes by default do), asked for or not.
    pub fn broker_with_default_scope(
        self,
        client_id: &str,
        lifespan: Duration,
        scope: &str,
    ) -> Self {
        self.with_broker(client_id, lifespan, false, vec![scope.to_owned()], None)
    }

    /// The broker clients above, differing only in these fields of [`ClientKind::Broker`].
    fn with_broker(
        mut self,
        client_id: &str,
        access_token_lifespan: Duration,
        every_audience: bool,
        default_scopes: Vec<String>,
        service_account: Option<String>,
    ) -> Self {
        self.clients.push(Client::new(
            client_id,
            ClientKind::Broker {
                access_token_lifespan,
                every_audience,
                default_scopes,
                service_account,
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

    pub(super) fn client(&self, client_id: &str) -> anyhow::Result<&Client> {
        self.clients
            .iter()
            .find(|c| c.id == client_id)
            .with_context(|| format!("realm {} has no client {client_id}", self.name))
    }

    pub(super) fn introspecting_client(&self) -> anyhow::Result<&Client> {
        self.clients
            .iter()
            .find(|c| c.kind == ClientKind::Introspector)
            .with_context(|| format!("realm {} has no introspector client", self.name))
    }

    /// Keycloak's representation of the realm, as `--import-realm` reads it.
    pub(super) fn representation(&self) -> RealmRepresentation {
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
            identity_providers: self
                .kubernetes_issuer
                .iter()
                .map(|issuer| IdentityProviderRepresentation {
                    alias: KUBERNETES_IDP.into(),
                    provider_id: "kubernetes".into(),
                    enabled: true,
                    config: [("issuer".to_owned(), issuer.clone())].into(),
                })
                .collect(),
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
        let mut default_client_scopes = vec![BASIC_SCOPE.to_owned()];
        let mut service_accounts_enabled = false;
        let mut client_authenticator_type = "client-secret";
        match &self.kind {
            ClientKind::Broker {
                access_token_lifespan,
                every_audience,
                default_scopes,
                service_account,
            } => {
                service_accounts_enabled = true;
                if let Some(sub) = service_account {
                    client_authenticator_type = "federated-jwt";
                    attributes.insert("jwt.credential.issuer".into(), KUBERNETES_IDP.into());
                    attributes.insert("jwt.credential.sub".into(), sub.clone());
                }
                attributes.insert("standard.token.exchange.enabled".into(), "true".into());
                attributes.insert(
                    "access.token.lifespan".into(),
                    access_token_lifespan.as_secs().to_string(),
                );
                optional_client_scopes = scopes
                    .iter()
                    .filter(|s| !default_scopes.contains(s))
                    .cloned()
                    .collect();
                default_client_scopes.extend(default_scopes.iter().cloned());
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
            client_authenticator_type: client_authenticator_type.into(),
            secret: self.secret.clone(),
            service_accounts_enabled,
            standard_flow_enabled: false,
            implicit_flow_enabled: false,
            direct_access_grants_enabled: false,
            attributes,
            protocol_mappers,
            default_client_scopes,
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
pub(super) struct RealmRepresentation {
    realm: String,
    enabled: bool,
    client_scopes: Vec<ClientScopeRepresentation>,
    default_default_client_scopes: Vec<String>,
    default_optional_client_scopes: Vec<String>,
    clients: Vec<ClientRepresentation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    identity_providers: Vec<IdentityProviderRepresentation>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityProviderRepresentation {
    alias: String,
    provider_id: String,
    enabled: bool,
    config: BTreeMap<String, String>,
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
}
