//! `kubectl keybroker` (the `kubectl-keybroker` binary, found by kubectl as a plugin): status,
//! checks, revocation and audit for platform teams, with kubectl's conventions (`-n`, `-A`,
//! `--context`, `--kubeconfig`, `-o json|yaml|wide`). The decisions come from the same pure
//! logic the webhook and the broker run; this module only reads the cluster and prints.
//!
//! Exit codes: 0 done (for `check`: the pod would get every credential it names), 1 otherwise
//! (an error, a refusal found by `check`, a wait that timed out), 2 a usage error.

pub mod audit;
pub mod check;
pub mod sidecars;
pub mod status;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde::Serialize;

use crate::broker::authz::INJECT_LABEL;
use crate::crd::{ApiKey, KeyProvider};
use crate::status::ready_condition;
use crate::webhook::inject::Settings;
use keybroker_contract::wire::RENEWED_AT_ANNOTATION;

/// The label the chart puts on the operator's pods and Deployment.
const OPERATOR_LABEL: &str = "app.kubernetes.io/name=keybroker";
/// The operator's container in the chart's Deployment.
const OPERATOR_CONTAINER: &str = "operator";
/// Sidecars scraped at once by `status` and the waits.
const SCRAPES_AT_ONCE: usize = 16;
/// How often a wait looks again.
const WAIT_STEP: Duration = Duration::from_millis(100);

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-keybroker",
    bin_name = "kubectl keybroker",
    version,
    about = "keybroker for platform teams: status of ApiKeys, checks of pods, revocation, audit"
)]
pub struct Args {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Every namespace (`status`).
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Output format (default: a table).
    #[arg(short = 'o', long, global = true, value_enum)]
    output: Option<Output>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Json,
    Yaml,
    Wide,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// ApiKeys with provider, Ready and reason, revoked, pods using each, the earliest credential
    /// expiry among them and today's usage.
    Status,
    /// Whether a pod would be injected and get credentials for each of its ApiKeys, and if not
    /// why and what to change: `check pod NAME`, or `check -f pod.yaml` before creating it.
    Check {
        /// `pod NAME` (or `pod/NAME`).
        target: Vec<String>,
        /// A pod manifest (YAML or JSON; `-` for stdin) not created yet.
        #[arg(short = 'f', long)]
        filename: Option<PathBuf>,
        /// keybroker's sidecar image (default: read from the operator's Deployment).
        #[arg(long)]
        sidecar_image: Option<String>,
    },
    /// Revokes an ApiKey (spec.revoked: true), then waits until the provider was told and the
    /// pods' credentials are gone.
    Revoke(Change),
    /// Lifts a revocation, then waits until the ApiKey is Ready and its pods hold credentials.
    Restore(Change),
    /// Has every pod of an ApiKey fetch new credentials now (told through the broker's
    /// revocation channel, no restart), then waits until each holds new ones.
    Renew {
        /// The ApiKey.
        name: String,
        /// How long to wait for the pods (e.g. `30s`; `0s` to not wait).
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Audit records (issuances, refusals, revocations) of the namespace (or `-A`) from the
    /// operator's logs.
    Audit {
        /// Only records of this ApiKey.
        api_key: Option<String>,
        /// Only records this recent, e.g. `1h`, `30m`.
        #[arg(long)]
        since: Option<String>,
        /// Read this log file (`-` for stdin) instead of the operator pods' logs.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct Change {
    /// The ApiKey.
    name: String,
    /// Do not ask for confirmation.
    #[arg(short = 'y', long)]
    yes: bool,
    /// How long to wait for the change to take effect (e.g. `60s`, `2m`; `0s` to not wait).
    #[arg(long, default_value = "60s")]
    timeout: String,
}

/// Runs one command; prints its error (without internals beyond the API's own message).
pub async fn run(args: Args) -> ExitCode {
    match dispatch(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(args: Args) -> anyhow::Result<bool> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => Config::from_kubeconfig(&options).await?,
    };
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("connecting to the Kubernetes API")?;
    let cli = Cli {
        client,
        namespace,
        all_namespaces: args.all_namespaces,
        output: args.output,
    };
    match args.command {
        Command::Status => cli.status().await,
        Command::Check {
            target,
            filename,
            sidecar_image,
        } => cli.check(&target, filename.as_deref(), sidecar_image).await,
        Command::Revoke(change) => cli.change(&change, true).await,
        Command::Restore(change) => cli.change(&change, false).await,
        Command::Renew { name, timeout } => cli.renew(&name, &timeout).await,
        Command::Audit {
            api_key,
            since,
            file,
        } => cli.audit(api_key.as_deref(), since.as_deref(), file).await,
    }
}

struct Cli {
    client: Client,
    namespace: String,
    all_namespaces: bool,
    output: Option<Output>,
}

impl Cli {
    fn keys(&self) -> Api<ApiKey> {
        match self.all_namespaces {
            true => Api::all(self.client.clone()),
            false => Api::namespaced(self.client.clone(), &self.namespace),
        }
    }

    /// Prints `value` as JSON or YAML when asked; `false` when a table is wanted instead.
    fn print_structured<T: Serialize>(&self, value: &T) -> anyhow::Result<bool> {
        match self.output {
            Some(Output::Json) => println!("{}", serde_json::to_string_pretty(value)?),
            Some(Output::Yaml) => print!("{}", yaml_serde::to_string(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    async fn opted_in_pods(&self) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = match self.all_namespaces {
            true => Api::all(self.client.clone()),
            false => Api::namespaced(self.client.clone(), &self.namespace),
        };
        let listed = api
            .list(&ListParams::default().labels(&format!("{INJECT_LABEL}=true")))
            .await
            .context("listing opted-in pods")?;
        Ok(listed.items)
    }

    /// The expiry each pod's sidecar reports for each ApiKey the pod names (a pod that does
    /// not answer is left out).
    async fn expiries(&self, pods: &[&Pod]) -> BTreeMap<(String, String, String), f64> {
        let scraped: Vec<_> = futures::stream::iter(pods)
            .map(|pod| async move { (pod, sidecars::scrape(&self.client, pod).await) })
            .buffer_unordered(SCRAPES_AT_ONCE)
            .collect()
            .await;
        let mut expiries = BTreeMap::new();
        for (pod, text) in scraped {
            let Ok(text) = text else { continue };
            let listed = pod
                .annotations()
                .get(crate::broker::authz::APIKEYS_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            for key in crate::broker::authz::listed_api_keys(&listed) {
                if let Some(expiry) = sidecars::expiry(&text, key) {
                    let ns = pod.namespace().unwrap_or_default();
                    expiries.insert((ns, pod.name_any(), key.to_owned()), expiry);
                }
            }
        }
        expiries
    }

    async fn status(&self) -> anyhow::Result<bool> {
        let keys = self.keys().list(&ListParams::default()).await?.items;
        let pods = self.opted_in_pods().await?;
        let users: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let expiries = self.expiries(&users).await;
        let rows = status::rows(&keys, &pods, &expiries);
        if !self.print_structured(&rows)? {
            if rows.is_empty() && !self.all_namespaces {
                println!("No ApiKeys in namespace {}.", self.namespace);
            } else {
                let wide = self.output == Some(Output::Wide);
                print!("{}", status::table(&rows, self.all_namespaces, wide));
            }
        }
        Ok(true)
    }

    async fn check(
        &self,
        target: &[String],
        filename: Option<&std::path::Path>,
        sidecar_image: Option<String>,
    ) -> anyhow::Result<bool> {
        let pod = match (filename, target) {
            (Some(file), []) => read_pod(file)?,
            (None, [kind, name]) if is_pod(kind) => self.live_pod(name).await?,
            (None, [one]) if one.split_once('/').is_some_and(|(k, _)| is_pod(k)) => {
                let (_, name) = one.split_once('/').unwrap_or_default();
                self.live_pod(name).await?
            }
            _ => bail!("name a pod: `check pod NAME`, or `check -f pod.yaml`"),
        };
        let namespace = pod.namespace().unwrap_or_else(|| self.namespace.clone());
        let image = match sidecar_image {
            Some(image) => image,
            None => self.sidecar_image().await?,
        };
        let facts = check::Facts {
            keys: Api::<ApiKey>::namespaced(self.client.clone(), &namespace)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(|k| (k.name_any(), k))
                .collect(),
            providers: Api::<KeyProvider>::all(self.client.clone())
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(|p| (p.name_any(), p))
                .collect(),
            namespace_labels: Api::<Namespace>::all(self.client.clone())
                .get_opt(&namespace)
                .await?
                .map(|n| n.labels().clone())
                .unwrap_or_default(),
        };
        let settings = Settings {
            image,
            ..Settings::default()
        };
        let report = check::check(&pod, &namespace, &facts, &settings);
        if !self.print_structured(&report)? {
            print!("{}", check::render(&report));
        }
        Ok(report.ok())
    }

    async fn live_pod(&self, name: &str) -> anyhow::Result<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(name)
            .await?
            .with_context(|| format!("pod {name} not found in namespace {}", self.namespace))
    }

    /// The `--sidecar-image` of the operator's Deployment (the one the webhook injects).
    async fn sidecar_image(&self) -> anyhow::Result<String> {
        let deployments = Api::<Deployment>::all(self.client.clone())
            .list(&ListParams::default().labels(OPERATOR_LABEL))
            .await
            .context("finding the keybroker operator's Deployment (or pass --sidecar-image)")?;
        deployments
            .items
            .iter()
            .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref())
            .flat_map(|spec| &spec.containers)
            .filter(|c| c.name == OPERATOR_CONTAINER)
            .flat_map(|c| c.args.iter().flatten())
            .find_map(|arg| arg.strip_prefix("--sidecar-image=").map(str::to_owned))
            .context("no keybroker operator Deployment found: pass --sidecar-image")
    }

    /// The pods that name ApiKey `name` of this namespace.
    async fn users_of(&self, name: &str) -> anyhow::Result<Vec<Pod>> {
        Ok(Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels(&format!("{INJECT_LABEL}=true")))
            .await?
            .items
            .into_iter()
            .filter(|p| status::uses(p, name))
            .collect())
    }

    /// `renew`: set the renewal annotation, then wait until every pod that held credentials
    /// holds newer ones.
    async fn renew(&self, name: &str, timeout: &str) -> anyhow::Result<bool> {
        let ns = &self.namespace;
        let timeout = wait_limit(timeout)?;
        let api = Api::<ApiKey>::namespaced(self.client.clone(), ns);
        api.get_opt(name)
            .await?
            .with_context(|| format!("ApiKey {name} not found in namespace {ns}"))?;
        let pods = self.users_of(name).await?;
        let before = self.expiries(&pods.iter().collect::<Vec<_>>()).await;
        let at = k8s_openapi::jiff::Timestamp::now();
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {RENEWED_AT_ANNOTATION: at.to_string()}}
            })),
        )
        .await?;
        println!("renewal of ApiKey {ns}/{name} asked at {at}");
        let holding: Vec<&Pod> = pods
            .iter()
            .filter(|p| before.contains_key(&(ns.clone(), p.name_any(), name.to_owned())))
            .collect();
        if timeout.is_zero() {
            return Ok(true);
        }
        let started = Instant::now();
        loop {
            let now = self.expiries(&holding).await;
            let pending: Vec<String> = holding
                .iter()
                .map(|p| (ns.clone(), p.name_any(), name.to_owned()))
                .filter(|id| now.get(id).is_none_or(|e| Some(e) == before.get(id)))
                .map(|(_, pod, _)| pod)
                .collect();
            if pending.is_empty() {
                println!(
                    "new credentials in {}/{} pods after {} ms{}",
                    holding.len(),
                    holding.len(),
                    started.elapsed().as_millis(),
                    match pods.len() - holding.len() {
                        0 => String::new(),
                        idle => format!(" ({idle} held none and fetch on their own schedule)"),
                    }
                );
                return Ok(true);
            }
            if started.elapsed() >= timeout {
                println!(
                    "timed out: {} of {} pods hold no new credentials: {}",
                    pending.len(),
                    holding.len(),
                    pending.join(", ")
                );
                return Ok(false);
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
    }

    /// `revoke` (`revoked`) or `restore`: confirm, patch, wait.
    async fn change(&self, change: &Change, revoked: bool) -> anyhow::Result<bool> {
        let (ns, name) = (&self.namespace, &change.name);
        let timeout = wait_limit(&change.timeout)?;
        let api = Api::<ApiKey>::namespaced(self.client.clone(), ns);
        let key = api
            .get_opt(name)
            .await?
            .with_context(|| format!("ApiKey {name} not found in namespace {ns}"))?;
        if key.spec.revoked == revoked {
            println!(
                "ApiKey {ns}/{name} is {} already",
                if revoked { "revoked" } else { "not revoked" }
            );
        } else {
            if !change.yes && !confirm(ns, name, revoked)? {
                println!("nothing changed");
                return Ok(false);
            }
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "revoked": revoked } })),
            )
            .await?;
            println!(
                "ApiKey {ns}/{name} {}",
                if revoked { "revoked" } else { "restored" }
            );
        }
        if timeout.is_zero() {
            return Ok(true);
        }
        let started = Instant::now();
        let deadline = started + timeout;
        // The controller revokes at the provider before it records the verdict, so a status of
        // this generation saying so means the provider was told.
        loop {
            let key = api.get(name).await?;
            let ready = ready_condition(key.status.as_ref());
            let observed =
                key.status.as_ref().and_then(|s| s.observed_generation) >= key.metadata.generation;
            let done = match revoked {
                true => ready.is_some_and(|c| c.status == "False" && c.reason == "Revoked"),
                false => ready.is_some_and(|c| c.status == "True"),
            };
            if observed && done {
                break;
            }
            if Instant::now() >= deadline {
                println!("timed out: the controller has not reconciled ApiKey {name} yet");
                return Ok(false);
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
        println!(
            "{} after {} ms",
            if revoked {
                "the provider was told to refuse its credentials"
            } else {
                "Ready again"
            },
            started.elapsed().as_millis()
        );
        let pods = self.users_of(name).await?;
        loop {
            let users: Vec<&Pod> = pods.iter().collect();
            let expiries = self.expiries(&users).await;
            let pending: Vec<String> = pods
                .iter()
                .filter(|p| {
                    let held = expiries.contains_key(&(ns.clone(), p.name_any(), name.clone()));
                    held == revoked
                })
                .map(ResourceExt::name_any)
                .collect();
            if pending.is_empty() {
                println!(
                    "{} {}/{} pods after {} ms",
                    if revoked {
                        "credentials gone from"
                    } else {
                        "credentials back in"
                    },
                    pods.len(),
                    pods.len(),
                    started.elapsed().as_millis()
                );
                return Ok(true);
            }
            if Instant::now() >= deadline {
                println!(
                    "timed out: {} of {} pods not confirmed: {}",
                    pending.len(),
                    pods.len(),
                    pending.join(", ")
                );
                return Ok(false);
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
    }

    async fn audit(
        &self,
        api_key: Option<&str>,
        since: Option<&str>,
        file: Option<PathBuf>,
    ) -> anyhow::Result<bool> {
        let since = since
            .map(|s| crate::policy::parse_ttl("--since", s).map_err(|e| anyhow::anyhow!("{e}")))
            .transpose()?;
        let log = match file {
            Some(path) if path.as_os_str() == "-" => std::io::read_to_string(std::io::stdin())?,
            Some(path) => std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
            None => self.operator_logs(since).await?,
        };
        let from = since.map(|s| {
            let now = k8s_openapi::jiff::Timestamp::now();
            now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
                i64::try_from(s.as_secs()).unwrap_or(i64::MAX),
            ))
            .unwrap_or(now)
            .to_string()
        });
        let namespace = (!self.all_namespaces).then_some(self.namespace.as_str());
        let mut records = audit::records(&log, namespace, api_key, from.as_deref());
        records.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
        if !self.print_structured(&records)? {
            print!("{}", audit::table(&records));
        }
        Ok(true)
    }

    /// The logs of every operator pod (the chart's label), concatenated.
    async fn operator_logs(&self, since: Option<Duration>) -> anyhow::Result<String> {
        let pods = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().labels(OPERATOR_LABEL))
            .await
            .context("finding the keybroker operator's pods (or pass --file)")?;
        if pods.items.is_empty() {
            bail!("no keybroker operator pods found (label {OPERATOR_LABEL}): pass --file");
        }
        let mut log = String::new();
        for pod in &pods.items {
            let api =
                Api::<Pod>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let params = LogParams {
                container: Some(OPERATOR_CONTAINER.into()),
                since_seconds: since.and_then(|s| i64::try_from(s.as_secs()).ok()),
                ..LogParams::default()
            };
            let text = api
                .logs(&pod.name_any(), &params)
                .await
                .with_context(|| format!("reading the log of pod {}", pod.name_any()))?;
            log.push_str(&text);
            log.push('\n');
        }
        Ok(log)
    }
}

/// A `--timeout` value: a duration such as `30s` or `2m`, or `0s`.
fn wait_limit(value: &str) -> anyhow::Result<Duration> {
    match value {
        "0" | "0s" => Ok(Duration::ZERO),
        _ => crate::policy::parse_ttl("--timeout", value).map_err(|e| anyhow::anyhow!("{e}")),
    }
}

fn is_pod(kind: &str) -> bool {
    matches!(kind, "pod" | "pods" | "po")
}

/// A pod manifest from `file` (`-`: stdin), YAML or JSON.
fn read_pod(file: &std::path::Path) -> anyhow::Result<Pod> {
    let text = match file.as_os_str() == "-" {
        true => std::io::read_to_string(std::io::stdin())?,
        false => {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        }
    };
    let pod: Pod = yaml_serde::from_str(&text)
        .with_context(|| format!("{} is not a Pod manifest", file.display()))?;
    Ok(pod)
}

/// Asks on the terminal; `true` only for `y` or `yes`.
fn confirm(ns: &str, name: &str, revoked: bool) -> anyhow::Result<bool> {
    let question = match revoked {
        true => format!(
            "Revoke ApiKey {ns}/{name}? Its pods lose their credentials and the provider refuses those issued. [y/N] "
        ),
        false => format!("Restore ApiKey {ns}/{name}? Its pods get credentials again. [y/N] "),
    };
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
