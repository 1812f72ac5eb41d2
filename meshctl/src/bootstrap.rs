//! `meshctl x grpc-bootstrap`: everything an unmodified gRPC application needs to join the mesh
//! proxyless. It writes, into one directory:
//! - `bootstrap.json` for `GRPC_XDS_BOOTSTRAP`, accepted by grpcio and grpc-js-xds alike;
//! - `cert-chain.pem`, `key.pem` and `root-cert.pem` (mode 0600), the workload's SPIFFE
//!   certificate from istiod-lite's CA, which the bootstrap's `file_watcher` provider reloads.
//!
//! The private key is generated here and never leaves the machine; istiod-lite signs a CSR and
//! decides the identity from the workload's service account. With `--watch` the certificate is
//! renewed (with a fresh key) at half its lifetime until the process is stopped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use hyper::Method;
use serde_json::{json, Value};

use crate::client::Client;

/// How often gRPC's file_watcher re-reads the files: a renewal is picked up this fast.
const REFRESH_INTERVAL: &str = "5s";
/// Retry delay after a failed renewal, while the current certificate is still valid.
const RETRY: Duration = Duration::from_secs(2);

pub struct Options {
    pub workload: String,
    pub out: PathBuf,
    pub watch: bool,
    pub xds_address: Option<String>,
    pub cert_ttl: Duration,
    pub server: String,
}

struct Issued {
    identity: String,
    ips: Vec<String>,
    kind: String,
    not_after: time::OffsetDateTime,
    lifetime: Duration,
}

pub async fn run(client: &Client, o: Options) -> anyhow::Result<()> {
    let (ns, name) = o
        .workload
        .split_once('/')
        .filter(|(n, w)| !n.is_empty() && !w.is_empty())
        .ok_or_else(|| anyhow!("--workload {:?}: expected NAMESPACE/NAME", o.workload))?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let out = std::fs::canonicalize(&o.out).with_context(|| format!("resolving {}", o.out.display()))?;
    let issued = issue(client, ns, name, &out, o.cert_ttl).await?;
    let xds = match &o.xds_address {
        Some(a) => a.clone(),
        None => default_xds_address(&o.server)?,
    };
    let bootstrap = bootstrap_json(ns, name, &issued, &out, &xds);
    write_file(&out.join("bootstrap.json"), serde_json::to_string_pretty(&bootstrap)?.as_bytes(), 0o644)?;
    println!("wrote {}/bootstrap.json for {} ({} {ns}/{name})", out.display(), issued.identity, issued.kind);
    println!("certificate valid until {}; use: GRPC_XDS_BOOTSTRAP={}/bootstrap.json", issued.not_after, out.display());
    if !o.watch {
        return Ok(());
    }
    let mut current = issued;
    loop {
        let wait = renew_after(current.not_after, current.lifetime);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown() => return Ok(()),
        }
        match issue(client, ns, name, &out, o.cert_ttl).await {
            Ok(next) => {
                println!("renewed {}; valid until {}", next.identity, next.not_after);
                current = next;
            }
            Err(e) if time::OffsetDateTime::now_utc() < current.not_after => {
                eprintln!("renewal failed, retrying in {}s: {e:#}", RETRY.as_secs());
                current.lifetime = Duration::ZERO;
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown() => return Ok(()),
                }
            }
            Err(e) => return Err(e.context("the certificate expired and could not be renewed")),
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Half-way through the lifetime (Istio's rule); after a failed attempt, `lifetime` is zero and
/// the caller retries on its own schedule.
fn renew_after(not_after: time::OffsetDateTime, lifetime: Duration) -> Duration {
    let left = (not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    let left = Duration::try_from(left).unwrap_or_default();
    left.saturating_sub(lifetime / 2).max(Duration::from_secs(1))
}

fn default_xds_address(server: &str) -> anyhow::Result<String> {
    let host = server
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .map(|hp| hp.rsplit_once(':').map(|(h, _)| h).unwrap_or(hp))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("cannot derive the xDS address from --server {server:?}; pass --xds-address"))?;
    Ok(format!("{host}:15010"))
}

async fn issue(client: &Client, ns: &str, name: &str, out: &Path, ttl: Duration) -> anyhow::Result<Issued> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key).context("building the CSR")?.pem()?;
    let body = json!({"name": name, "csr": csr, "ttlSeconds": ttl.as_secs()});
    let reply = client
        .ok(Method::POST, &format!("/apis/trellis.dev/v1/namespaces/{ns}/workloadcertificates"), Some(&body))
        .await?;
    let v = reply.body;
    let chain: Vec<&str> = v["certChain"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let root = v["rootCert"].as_str().ok_or_else(|| anyhow!("istiod-lite answered without rootCert"))?;
    let leaf = chain.first().ok_or_else(|| anyhow!("istiod-lite answered without a certificate"))?;
    let (not_before, not_after) = validity(leaf)?;
    // Key first: a reader that sees the new chain with the old key fails one handshake at most,
    // and file_watcher re-reads both on its next refresh.
    write_file(&out.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&out.join("cert-chain.pem"), chain.join("").as_bytes(), 0o600)?;
    write_file(&out.join("root-cert.pem"), root.as_bytes(), 0o600)?;
    Ok(Issued {
        identity: v["identity"].as_str().unwrap_or_default().to_string(),
        ips: v["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from).collect(),
        kind: v["kind"].as_str().unwrap_or_default().to_string(),
        not_after,
        lifetime: Duration::try_from(not_after - not_before).unwrap_or_default(),
    })
}

fn validity(pem: &str) -> anyhow::Result<(time::OffsetDateTime, time::OffsetDateTime)> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| anyhow!("certificate PEM: {e}"))?;
    let cert = p.parse_x509().map_err(|e| anyhow!("certificate: {e}"))?;
    Ok((cert.validity().not_before.to_datetime(), cert.validity().not_after.to_datetime()))
}

fn bootstrap_json(ns: &str, name: &str, issued: &Issued, out: &Path, xds: &str) -> Value {
    let ip = issued.ips.first().cloned().unwrap_or_default();
    let file = |f: &str| out.join(f).display().to_string();
    json!({
        "xds_servers": [{
            "server_uri": xds,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": format!("sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local"),
            "locality": {},
            "metadata": {
                "GENERATOR": "grpc",
                "NAMESPACE": ns,
                "INSTANCE_IPS": issued.ips.join(","),
                "WORKLOAD_NAME": name,
                "SPIFFE_ID": issued.identity,
            },
        },
        "certificate_providers": {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": file("cert-chain.pem"),
                    "private_key_file": file("key.pem"),
                    "ca_certificate_file": file("root-cert.pem"),
                    "refresh_interval": REFRESH_INTERVAL,
                },
            },
        },
        "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
    })
}

/// Writes atomically (temporary file, then rename) with `mode` set before the data lands, so a
/// secret is never readable by others, not even briefly, and readers never see half a file.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    if std::fs::metadata(path).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)? != mode {
        bail!("{} does not have mode {mode:o}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xds_address_defaults_to_the_api_host() {
        assert_eq!(default_xds_address("http://10.0.0.1:15014").unwrap(), "10.0.0.1:15010");
        assert_eq!(default_xds_address("http://istiod:15014/").unwrap(), "istiod:15010");
        assert!(default_xds_address("https://x").is_err());
    }

    #[test]
    fn renewal_is_at_half_life() {
        let now = time::OffsetDateTime::now_utc();
        let d = renew_after(now + time::Duration::seconds(100), Duration::from_secs(100));
        assert!((49..=50).contains(&d.as_secs()), "{d:?}");
        assert_eq!(renew_after(now - time::Duration::seconds(5), Duration::from_secs(100)), Duration::from_secs(1));
    }

    #[test]
    fn secrets_are_written_0600_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_file(&p, b"one", 0o600).unwrap();
        write_file(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left behind");
    }
}
