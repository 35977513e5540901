//! What keybroker adds to a pod: the two volumes and the native sidecar container.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keybroker_contract::{env, paths};
use serde_json::{Value, json};

use super::{
    CREDENTIALS_DIR, CREDENTIALS_VOLUME, FileAccess, SIDECAR_NAME, SIDECAR_UID, Settings,
    TOKEN_DIR, TOKEN_VOLUME,
};

pub(super) fn volumes(settings: &Settings) -> Vec<Value> {
    vec![
        json!({
            "name": CREDENTIALS_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": settings.volume_size_limit},
        }),
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": keybroker_contract::wire::AUDIENCE,
                "expirationSeconds": settings.token_expiration_seconds,
                "path": "token",
            }}]},
        }),
    ]
}

/// The native sidecar: an init container with `restartPolicy: Always` whose startupProbe
/// passes once the first credentials are written, so app containers start with them in place.
/// `gateway`: the pod has a gateway ApiKey, so the sidecar opens its local gateway.
/// `reload_url`: the app's loopback URL told of new credentials (checked already).
pub(super) fn sidecar(
    names: &[String],
    access: &FileAccess,
    settings: &Settings,
    gateway: bool,
    reload_url: Option<&String>,
) -> Container {
    let mut env = vec![
        (env::BROKER_URL, settings.broker_url.clone()),
        (env::BROKER_CA, settings.broker_ca.clone()),
        (env::API_KEYS, names.join(",")),
        (env::TOKEN_FILE, format!("{TOKEN_DIR}/token")),
        (env::OUTPUT_DIR, CREDENTIALS_DIR.to_owned()),
        (env::FILE_MODE, access.mode.to_owned()),
        (
            env::CREDENTIALS_ADDR,
            format!("127.0.0.1:{}", settings.credentials_port),
        ),
        (
            env::HEALTH_ADDR,
            format!("0.0.0.0:{}", settings.health_port),
        ),
    ];
    if let Some(url) = reload_url {
        env.push((env::RELOAD_URL, url.clone()));
    }
    if gateway {
        env.push((
            env::GATEWAY_ADDR,
            format!("127.0.0.1:{}", settings.gateway_port),
        ));
    }
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(settings.health_port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    let quantity = |q: &str| Quantity(q.to_owned());
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        restart_policy: Some("Always".into()),
        env: Some(
            env.into_iter()
                .map(|(name, value)| EnvVar {
                    name: name.into(),
                    value: Some(value),
                    value_from: None,
                })
                .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("kb-health".into()),
            container_port: i32::from(settings.health_port),
            ..ContainerPort::default()
        }]),
        // Up to five minutes for the first credentials (a new ApiKey may still be reconciling).
        startup_probe: Some(probe(paths::STARTUPZ, 1, 300)),
        liveness_probe: Some(probe(paths::LIVEZ, 10, 3)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CREDENTIALS_VOLUME.into(),
                mount_path: CREDENTIALS_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity(&settings.cpu_request)),
                ("memory".to_owned(), quantity(&settings.memory_request)),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                quantity(&settings.memory_limit),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(access.run_as_user.unwrap_or(SIDECAR_UID)),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}
