//! Refusals of pods whose spec would collide with, or get around, what keybroker adds.
//!
//! The pod's owner writes the whole spec, so nothing keybroker relies on may come from it:
//! no container but the sidecar mounts the token volume, app containers mount the credentials
//! only read-only (and only where keybroker puts them), no volume of the pod's own carries a
//! token for the keybroker audience (the broker would accept it from any container), and a pod
//! that claims to be injected already must really carry keybroker's sidecar; otherwise it
//! would be admitted without the webhook's checks and still be handed credentials.

use std::collections::BTreeSet;

use super::view::{ContainerView, PodView, SpecView};
use super::{
    CREDENTIALS_DIR, CREDENTIALS_VOLUME, Denial, INJECTED_ANNOTATION, SIDECAR_NAME,
    SKIP_CONTAINERS_ANNOTATION, Settings, TOKEN_VOLUME,
};
use keybroker_contract::wire::AUDIENCE;

/// Every container of the pod: app, init and ephemeral alike.
fn all_containers(spec: &SpecView) -> impl Iterator<Item = &ContainerView> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .chain(spec.ephemeral_containers.iter().flatten())
}

/// An image reference without its tag and digest: `registry/path/name`.
fn image_repository(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => image,
    }
}

/// True when `image` comes from the repository of keybroker's sidecar image `ours`, whatever
/// its tag or digest: pods injected before an upgrade of the operator keep working, and only
/// whoever may push to that repository can put code where the token is.
pub fn is_sidecar_image(image: &str, ours: &str) -> bool {
    image_repository(image) == image_repository(ours)
}

/// True when the pod says it was injected (the annotation) or has a container named like the
/// sidecar: such a pod is not injected again, it is checked by [`check_injected`].
pub fn claims_injection(pod: &PodView) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    annotated
        || pod
            .spec
            .as_ref()
            .is_some_and(|s| all_containers(s).any(|c| c.name == SIDECAR_NAME))
}

/// Refuses pods where what keybroker adds would collide with what the pod has, or where the
/// pod brings its own way to the broker.
pub(super) fn check_conflicts(
    spec: &SpecView,
    skipped: &BTreeSet<&str>,
    settings: &Settings,
) -> Result<(), Denial> {
    for volume in spec.volumes.iter().flatten() {
        if volume.name == CREDENTIALS_VOLUME || volume.name == TOKEN_VOLUME {
            return Err(Denial::Conflict(format!(
                "the pod already has a volume named {}, a name keybroker reserves; rename it",
                volume.name
            )));
        }
    }
    check_foreign_tokens(spec, None)?;
    for container in all_containers(spec) {
        for mount in container.volume_mounts.iter().flatten() {
            if mount.name == CREDENTIALS_VOLUME || mount.name == TOKEN_VOLUME {
                return Err(reserved_mount(&container.name, &mount.name));
            }
            let path = mount.mount_path.trim_end_matches('/');
            let under = path == CREDENTIALS_DIR || path.starts_with(&format!("{CREDENTIALS_DIR}/"));
            if under && !skipped.contains(container.name.as_str()) {
                return Err(Denial::Conflict(format!(
                    "container {} already mounts volume {} at {}, where keybroker mounts the credentials; move it, or list the container in {SKIP_CONTAINERS_ANNOTATION}",
                    container.name, mount.name, mount.mount_path
                )));
            }
        }
        for port in container.ports.iter().flatten() {
            let port = port.container_port;
            if port == i32::from(settings.credentials_port)
                || port == i32::from(settings.health_port)
                || port == i32::from(settings.gateway_port)
            {
                return Err(Denial::Conflict(format!(
                    "container {} uses port {port}, which the keybroker sidecar needs in the pod's network namespace; use another port",
                    container.name
                )));
            }
        }
    }
    Ok(())
}

fn reserved_mount(container: &str, volume: &str) -> Denial {
    Denial::Conflict(format!(
        "container {container} mounts volume {volume}, which only keybroker's sidecar may mount (keybroker mounts the credentials read-only into app containers itself); remove that volumeMount"
    ))
}

/// Refuses any volume other than `ours` that projects a token for the keybroker audience.
fn check_foreign_tokens(spec: &SpecView, ours: Option<&str>) -> Result<(), Denial> {
    for volume in spec.volumes.iter().flatten() {
        if Some(volume.name.as_str()) == ours {
            continue;
        }
        if volume.token_audiences().any(|a| a == AUDIENCE) {
            return Err(Denial::Conflict(format!(
                "volume {} projects a service-account token for the {AUDIENCE} audience, which only keybroker's sidecar may hold; remove it (the sidecar fetches the credentials)",
                volume.name
            )));
        }
    }
    Ok(())
}

/// Admits a pod that claims to be injected only when it carries keybroker's injection whole:
/// the annotation, one sidecar (keybroker's image, a native sidecar, the only container with
/// the token), the credentials volume (memory `emptyDir`) and the token volume (keybroker's
/// audience), and app containers that mount the credentials read-only at most. This is what a
/// re-invocation sees; anything else is a pod that would run without keybroker's checks.
pub(super) fn check_injected(pod: &PodView, sidecar_image: &str) -> Result<(), Denial> {
    let forged = |what: &str| {
        Denial::Conflict(format!(
            "the pod carries the {INJECTED_ANNOTATION} annotation or a container named {SIDECAR_NAME}, but {what}: remove both (keybroker adds them) and create the pod again"
        ))
    };
    let empty = SpecView::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    if !annotated {
        return Err(forged(&format!(
            "not the {INJECTED_ANNOTATION} annotation keybroker sets"
        )));
    }
    let named: Vec<&ContainerView> = all_containers(spec)
        .filter(|c| c.name == SIDECAR_NAME)
        .collect();
    let [sidecar] = named.as_slice() else {
        return Err(forged("not exactly one keybroker sidecar"));
    };
    let native = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| std::ptr::eq(c, *sidecar));
    if !native || sidecar.restart_policy.as_deref() != Some("Always") {
        return Err(forged(
            "its keybroker-sidecar is not a native sidecar (an init container with restartPolicy: Always)",
        ));
    }
    if !sidecar
        .image
        .as_deref()
        .is_some_and(|image| is_sidecar_image(image, sidecar_image))
    {
        return Err(forged(
            "its keybroker-sidecar does not run keybroker's image",
        ));
    }
    let volume = |name: &str| spec.volumes.iter().flatten().find(|v| v.name == name);
    if volume(CREDENTIALS_VOLUME).is_none_or(|v| v.empty_dir.is_none()) {
        return Err(forged(&format!("no {CREDENTIALS_VOLUME} emptyDir volume")));
    }
    let token_ok = volume(TOKEN_VOLUME).is_some_and(|v| {
        let audiences: Vec<&str> = v.token_audiences().collect();
        audiences == [AUDIENCE]
    });
    if !token_ok {
        return Err(forged(&format!(
            "no {TOKEN_VOLUME} volume with one token for the {AUDIENCE} audience"
        )));
    }
    check_foreign_tokens(spec, Some(TOKEN_VOLUME))?;
    for container in all_containers(spec) {
        if std::ptr::eq(container, *sidecar) {
            continue;
        }
        for mount in container.volume_mounts.iter().flatten() {
            let credentials_ro = mount.name == CREDENTIALS_VOLUME
                && mount.read_only == Some(true)
                && mount.mount_path.trim_end_matches('/') == CREDENTIALS_DIR;
            if (mount.name == CREDENTIALS_VOLUME && !credentials_ro) || mount.name == TOKEN_VOLUME {
                return Err(reserved_mount(&container.name, &mount.name));
            }
        }
    }
    Ok(())
}
