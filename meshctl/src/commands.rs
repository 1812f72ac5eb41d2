//! Command definitions and their implementations.

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use trellis_config::load::{load_path, Loaded};
use trellis_config::Kind;

use crate::client::{status_message, Client};
use crate::output::{age, kind_cells, kind_columns, render_table, to_yaml, Format};

#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about = "Apply and inspect Trellis mesh config")]
pub struct Cli {
    /// istiod-lite config API.
    #[arg(long, global = true, env = "TRELLIS_SERVER", default_value = "http://127.0.0.1:15014")]
    pub server: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or replace objects from a file, a directory, or - (stdin). Every object is
    /// validated before any is written.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Namespace for objects that do not name one.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Delete objects named in files (-f) or one object by kind and name.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: Option<String>,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Treat "not found" as success.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Show objects of a kind.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// List across all namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Set (key=value) or remove (key-) labels, e.g. `label namespace demo istio.io/dataplane-mode=ambient`.
    Label {
        kind: String,
        name: String,
        #[arg(required = true)]
        labels: Vec<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Allow changing the value of an existing label.
        #[arg(long)]
        overwrite: bool,
    },
    /// Create credentials.
    Create {
        #[command(subcommand)]
        what: CreateCommand,
    },
    /// What ztunnels hold, from their admin endpoints (found via Node InternalIPs).
    ZtunnelConfig {
        #[arg(value_enum)]
        view: crate::inspect::ZtunnelView,
        /// Only this node's ztunnel.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// Ask these admin URLs instead (e.g. a port-forward); repeatable.
        #[arg(long = "ztunnel-admin")]
        ztunnel_admin: Vec<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Every proxy connected to istiod-lite: last ACKed version per type, and any NACK.
    ProxyStatus {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Find misconfigurations across objects, from files (-f) or the live config (default).
    /// Exits 1 when an error or warning is found.
    Analyze {
        #[arg(short = 'f', long = "filename", conflicts_with = "live")]
        file: Option<String>,
        #[arg(long)]
        live: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Experimental commands.
    X {
        #[command(subcommand)]
        what: XCommand,
    },
    /// A local multi-node mesh in network namespaces (needs root).
    Lab {
        /// Where the lab records what it created (and keeps logs).
        #[arg(long, global = true, default_value = crate::lab::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
        #[command(subcommand)]
        command: crate::lab::LabCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum XCommand {
    /// A pod's identity, enrollment and why, applicable policies and their effect, and the
    /// Services it backs: `x describe pod demo/echo-v1`.
    Describe {
        kind: String,
        target: String,
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Write a proxyless gRPC bootstrap (GRPC_XDS_BOOTSTRAP) and the workload's certificate, key
    /// and root (mode 0600) for grpcio and grpc-js-xds: `x grpc-bootstrap --workload demo/echo`.
    GrpcBootstrap {
        /// NAMESPACE/NAME of a Pod or WorkloadEntry; it must have a service account.
        #[arg(long)]
        workload: String,
        #[arg(long, default_value = ".")]
        out: std::path::PathBuf,
        /// Keep running and renew the certificate at half its lifetime.
        #[arg(long)]
        watch: bool,
        /// xDS server for the bootstrap; default: the --server host, port 15010.
        #[arg(long)]
        xds_address: Option<String>,
        /// Requested certificate lifetime (istiod-lite caps it at its --max-cert-ttl).
        #[arg(long, default_value = "24h", value_parser = trellis_config::duration::parse_duration)]
        cert_ttl: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum CreateCommand {
    /// Issue (or rotate) a node's bearer token for the CA and xDS. Printed once.
    Token {
        /// Only "node" tokens exist.
        kind: String,
        name: String,
    },
}

fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Kind::from_cli(s).ok_or_else(|| {
        let known: Vec<_> = Kind::ALL.iter().map(|k| k.plural()).collect();
        anyhow!("unknown resource type {s:?}; known types: {}", known.join(", "))
    })
}

fn object_path(kind: Kind, ns: &str, name: &str) -> String {
    format!("{}/{name}", kind.collection_path(Some(ns)))
}

fn label_of(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.name().to_ascii_lowercase())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.server)?;
    let server = cli.server;
    match cli.command {
        Command::Lab { state_dir, command } => crate::lab::run(command, &state_dir).await,
        Command::ZtunnelConfig { view, node, admin_port, ztunnel_admin, output } => {
            crate::inspect::ztunnel_config(&client, view, node.as_deref(), admin_port, &ztunnel_admin, output).await
        }
        Command::ProxyStatus { output } => crate::inspect::proxy_status(&client, output).await,
        Command::Analyze { file, live: _, output } => analyze(&client, file.as_deref(), output).await,
        Command::X { what: XCommand::Describe { kind, target, admin_port, output } } => {
            crate::describe::run(&client, &kind, &target, admin_port, output).await
        }
        Command::X { what: XCommand::GrpcBootstrap { workload, out, watch, xds_address, cert_ttl } } => {
            let options =
                crate::bootstrap::Options { workload, out, watch, xds_address, cert_ttl, server: server.clone() };
            crate::bootstrap::run(&client, options).await
        }
        Command::Apply { file, namespace } => apply(&client, &file, &namespace).await,
        Command::Delete { file, kind, name, namespace, ignore_not_found } => {
            delete(&client, file, kind, name, &namespace, ignore_not_found).await
        }
        Command::Get { kind, name, namespace, all_namespaces, output } => {
            get(&client, parse_kind(&kind)?, name.as_deref(), (!all_namespaces).then_some(namespace.as_str()), output)
                .await
        }
        Command::Label { kind, name, labels, namespace, overwrite } => {
            label(&client, parse_kind(&kind)?, &name, &namespace, &labels, overwrite).await
        }
        Command::Create { what: CreateCommand::Token { kind, name } } => {
            if kind != "node" {
                bail!("only node tokens can be created: `meshctl create token node NAME`");
            }
            let r = client.ok(Method::PUT, &format!("/apis/trellis.dev/v1/nodetokens/{name}"), None).await?;
            println!("{}", r.body.get("token").and_then(Value::as_str).unwrap_or_default());
            Ok(())
        }
    }
}

fn load(file: &str, namespace: &str) -> anyhow::Result<Vec<Loaded>> {
    load_path(file, namespace).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        anyhow!("{}\n{} problem(s) found; nothing was applied", lines.join("\n"), errs.len())
    })
}

async fn apply(client: &Client, file: &str, namespace: &str) -> anyhow::Result<()> {
    let mut objects = load(file, namespace)?;
    // Namespaces before their contents.
    objects.sort_by_key(|l| l.object.kind());
    let mut failures = 0;
    for l in objects {
        let o = &l.object;
        let m = o.meta();
        let path = object_path(o.kind(), m.namespace.as_deref().unwrap_or_default(), &m.name);
        let r = client.call(Method::PUT, &path, Some(&o.to_value())).await?;
        if r.status.is_success() {
            println!("{} {}", label_of(o.kind(), &m.name), r.outcome.as_deref().unwrap_or("configured"));
        } else {
            failures += 1;
            eprintln!("error: {}: {}", l.source, status_message(&r));
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) failed to apply");
    }
    Ok(())
}

async fn delete(
    client: &Client,
    file: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    namespace: &str,
    ignore_not_found: bool,
) -> anyhow::Result<()> {
    let targets: Vec<(Kind, String, String)> = match (file, kind, name) {
        (Some(f), None, None) => {
            let mut objs = load(&f, namespace)?;
            objs.sort_by_key(|l| std::cmp::Reverse(l.object.kind()));
            objs.iter()
                .map(|l| {
                    (
                        l.object.kind(),
                        l.object.meta().namespace.clone().unwrap_or_default(),
                        l.object.meta().name.clone(),
                    )
                })
                .collect()
        }
        (None, Some(k), Some(n)) => vec![(parse_kind(&k)?, namespace.to_string(), n)],
        _ => bail!("use either `delete -f FILE` or `delete KIND NAME [-n NS]`"),
    };
    let mut failures = 0;
    for (kind, ns, name) in targets {
        let r = client.call(Method::DELETE, &object_path(kind, &ns, &name), None).await?;
        if r.status.is_success() {
            println!("{} deleted", label_of(kind, &name));
        } else if r.status == StatusCode::NOT_FOUND && ignore_not_found {
            continue;
        } else {
            failures += 1;
            eprintln!("error: {}", status_message(&r));
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) could not be deleted");
    }
    Ok(())
}

async fn get(
    client: &Client,
    kind: Kind,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Format,
) -> anyhow::Result<()> {
    let (items, single) = match name {
        Some(n) => {
            let r = client.ok(Method::GET, &object_path(kind, namespace.unwrap_or("default"), n), None).await?;
            (vec![r.body], true)
        }
        None => {
            let r = client.ok(Method::GET, &kind.collection_path(namespace), None).await?;
            (r.body.get("items").and_then(Value::as_array).cloned().unwrap_or_default(), false)
        }
    };
    let doc = if single { items[0].clone() } else { json!({"apiVersion": "v1", "kind": "List", "items": items}) };
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&doc).context("encoding JSON")?),
        Format::Yaml => print!("{}", to_yaml(&doc)),
        Format::Table => {
            if items.is_empty() {
                match namespace.filter(|_| kind.namespaced()) {
                    Some(ns) => eprintln!("No {} found in namespace {ns}.", kind.plural()),
                    None => eprintln!("No {} found.", kind.plural()),
                }
                return Ok(());
            }
            let show_ns = namespace.is_none() && kind.namespaced();
            let mut headers = Vec::new();
            if show_ns {
                headers.push("NAMESPACE");
            }
            headers.push("NAME");
            headers.extend(kind_columns(kind));
            headers.push("AGE");
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|o| {
                    let mut row = Vec::new();
                    if show_ns {
                        row.push(
                            o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_string(),
                        );
                    }
                    row.push(o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string());
                    row.extend(kind_cells(kind, o));
                    row.push(age(o.pointer("/metadata/creationTimestamp").and_then(Value::as_str)));
                    row
                })
                .collect();
            print!("{}", render_table(&headers, &rows));
        }
    }
    Ok(())
}

enum LabelChange {
    Set(String, String),
    Remove(String),
}

fn parse_label_args(args: &[String]) -> anyhow::Result<Vec<LabelChange>> {
    args.iter()
        .map(|a| {
            if let Some(k) = a.strip_suffix('-') {
                Ok(LabelChange::Remove(k.to_string()))
            } else if let Some((k, v)) = a.split_once('=') {
                Ok(LabelChange::Set(k.to_string(), v.to_string()))
            } else {
                Err(anyhow!("{a:?} is neither key=value nor key-"))
            }
        })
        .collect()
}

/// Read-modify-write with the object's resourceVersion as a precondition, retried on conflict,
/// so a concurrent writer's change is never overwritten.
async fn label(
    client: &Client,
    kind: Kind,
    name: &str,
    namespace: &str,
    args: &[String],
    overwrite: bool,
) -> anyhow::Result<()> {
    let changes = parse_label_args(args)?;
    let path = object_path(kind, namespace, name);
    for _attempt in 0..5 {
        let mut obj = client.ok(Method::GET, &path, None).await?.body;
        let labels = obj
            .pointer_mut("/metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| anyhow!("{} has no metadata", label_of(kind, name)))?
            .entry("labels")
            .or_insert_with(|| json!({}));
        let Some(labels) = labels.as_object_mut() else {
            bail!("{}: metadata.labels is not a map", label_of(kind, name))
        };
        for c in &changes {
            match c {
                LabelChange::Set(k, v) => {
                    if let Some(old) = labels.get(k).and_then(Value::as_str) {
                        if old != v && !overwrite {
                            bail!(
                                "{}: label {k:?} already has value {old:?}; use --overwrite to change it",
                                label_of(kind, name)
                            );
                        }
                    }
                    labels.insert(k.clone(), Value::String(v.clone()));
                }
                LabelChange::Remove(k) => {
                    labels.remove(k);
                }
            }
        }
        let r = client.call(Method::PUT, &path, Some(&obj)).await?;
        match r.status {
            s if s.is_success() => {
                let outcome = if r.outcome.as_deref() == Some("unchanged") { "not labeled" } else { "labeled" };
                println!("{} {outcome}", label_of(kind, name));
                return Ok(());
            }
            StatusCode::CONFLICT => continue,
            _ => bail!("{}", status_message(&r)),
        }
    }
    bail!("{}: kept conflicting with concurrent writers; try again", label_of(kind, name))
}

async fn analyze(client: &Client, file: Option<&str>, output: Format) -> anyhow::Result<()> {
    let cluster = match file {
        Some(f) => crate::cluster::Cluster { objects: load(f, "default")?.into_iter().map(|l| l.object).collect() },
        None => crate::cluster::Cluster::fetch(client).await?,
    };
    let findings = crate::analyze::analyze(&cluster);
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&findings)?),
        Format::Table if findings.is_empty() => println!("No problems found."),
        Format::Table => {
            let rows: Vec<Vec<String>> = findings
                .iter()
                .map(|f| vec![f.code.to_string(), format!("{:?}", f.severity), f.resource.clone(), f.message.clone()])
                .collect();
            print!("{}", render_table(&["CODE", "SEVERITY", "RESOURCE", "MESSAGE"], &rows));
        }
    }
    let serious = findings.iter().filter(|f| f.severity != crate::analyze::Severity::Info).count();
    if serious > 0 {
        bail!("{serious} problem(s) found");
    }
    Ok(())
}
