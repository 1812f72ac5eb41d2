//! The host side of the lab: network namespaces and links through iproute2, and processes.
//!
//! The lab drives `ip` rather than netlink directly: `ip netns` is the convention other tools
//! (and people debugging the lab) understand, and `ip netns exec` sets up the per-netns `/sys`
//! and `/etc/netns/<name>/` files that commands run in a pod expect.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::state::Proc;

const NETNS_DIR: &str = "/var/run/netns";

/// Runs `ip ARGS…`; the error carries the command and what `ip` said.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a bash command inside a network namespace.
pub fn netns_sh(netns: &str, cmd: &str) -> anyhow::Result<String> {
    ip(&["netns", "exec", netns, "bash", "-c", cmd])
}

pub fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn netns_list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else { return Vec::new() };
    let mut names: Vec<String> = dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names
}

pub fn netns_pids(name: &str) -> Vec<u32> {
    ip(&["netns", "pids", name])
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The first `name` on PATH, as an absolute path.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// Starts a long-running process (in `netns`, if given) that outlives meshctl: its own process
/// group, stdin closed, output appended to `log`.
pub fn spawn(
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<Proc> {
    let out =
        OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
    let exe = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    Ok(Proc { pid: child.id(), exe, log: log.to_path_buf() })
}

/// Whether the recorded process still runs (and is still the program we started, not a
/// recycled pid). `ip netns exec` is that program until it execs it.
pub fn alive(p: &Proc) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{}", p.pid));
    let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) else { return false };
    if exe == p.exe {
        // A zombie keeps its exe link until reaped; its state says so.
        return !std::fs::read_to_string(proc_dir.join("stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')));
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    exe.file_name().is_some_and(|n| n == "ip")
        && cmdline.split(|b| *b == 0).any(|a| Path::new(std::str::from_utf8(a).unwrap_or_default()) == p.exe)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// SIGTERM, then SIGKILL after `grace`. Returns whether the process was running.
pub fn stop(p: &Proc, grace: Duration) -> bool {
    if !alive(p) {
        return false;
    }
    signal(p.pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(p) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(p.pid, libc::SIGKILL);
    true
}

/// Kills whatever still runs in a network namespace (what a crash left behind).
pub fn kill_netns_pids(netns: &str) -> usize {
    let pids = netns_pids(netns);
    for pid in &pids {
        signal(*pid, libc::SIGKILL);
    }
    pids.len()
}

pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    let target = path.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(target.as_ref()))
}

pub fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    if is_mountpoint(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(path).output().context("running mount")?;
    if !out.status.success() {
        return Err(anyhow!(
            "cannot mount a BPF filesystem at {} ({}): the kernel needs CONFIG_BPF_SYSCALL for eBPF capture",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub fn umount(path: &Path) -> bool {
    is_mountpoint(path) && Command::new("umount").arg("-l").arg(path).status().is_ok_and(|s| s.success())
}
