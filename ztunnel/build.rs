//! Compiles the eBPF capture programs (`bpf/*.c`) with clang. Rust cannot target BPF on the
//! stable toolchain without rust-src, so the programs are C; the loader is Rust (aya).

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 1] = ["capture"];

fn clang() -> Option<String> {
    let candidates =
        std::env::var("CLANG").into_iter().chain(["clang", "clang-19", "clang-16", "clang-14"].map(String::from));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

fn main() {
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let Some(clang) = clang() else {
        panic!(
            "ztunnel's eBPF capture programs need clang with the BPF target, and libbpf headers: \
             install them with `apt-get install -y clang libbpf-dev` (or run `make deps`), or set CLANG=/path/to/clang"
        );
    };
    // The kernel UAPI headers include <asm/types.h> from the multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    for name in SOURCES {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .output()
            .unwrap_or_else(|e| panic!("running {clang}: {e}"));
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let hint = if stderr.contains("bpf/bpf_helpers.h") { " (install libbpf-dev)" } else { "" };
            panic!("compiling {src} with {clang} failed{hint}:\n{stderr}");
        }
    }
}
