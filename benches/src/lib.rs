//! What the benchmark harnesses share: a running istiod-lite, reading a server's cost from
//! `/proc`, and free ports.

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0)).unwrap_or(0)
}

/// A process's user+system CPU seconds so far (the bench's own clients share the 2 cores, so
/// wall time alone overstates the server's cost).
pub fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    ticks / 100.0
}

/// A process's peak resident set (VmHWM), in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// An istiod-lite binary running on free loopback ports with a fresh state directory; killed when
/// dropped.
pub struct Istiod {
    child: std::process::Child,
    pub api: u16,
    pub xds: u16,
    _state: tempfile::TempDir,
}

impl Istiod {
    /// Starts `bin` and waits (up to 30 s) until its `/ready` answers; returns it with an API client.
    pub async fn start(bin: &str) -> anyhow::Result<(Istiod, meshctl::client::Client)> {
        use anyhow::Context;
        let state = tempfile::tempdir()?;
        let (api, xds, sec) = (free_port(), free_port(), free_port());
        let child = std::process::Command::new(bin)
            .args(["--state-dir", &state.path().join("state").display().to_string()])
            .args(["--api-addr", &format!("127.0.0.1:{api}"), "--xds-addr", &format!("127.0.0.1:{xds}")])
            .args(["--secure-addr", &format!("127.0.0.1:{sec}")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let istiod = Istiod { child, api, xds, _state: state };
        let client = meshctl::client::Client::new(&format!("http://127.0.0.1:{api}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while client.call(hyper::Method::GET, "/ready", None).await.map(|r| !r.status.is_success()).unwrap_or(true) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("istiod-lite did not become ready");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok((istiod, client))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
