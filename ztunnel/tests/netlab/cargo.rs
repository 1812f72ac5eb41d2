//! Shared with meshctl's lab test (included there by path): both build the other binaries.

use std::process::Command;

/// `cargo` for building the other binaries, without the variables cargo sets for a test process:
/// a build script that reads one of them (ring reads `CARGO_MANIFEST_DIR`) would otherwise see it
/// change between this build and a build from the shell, and each would rebuild ring and everything
/// above it.
pub fn nested_cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_for_tests = ["CARGO_PKG_", "CARGO_BIN_EXE_"].iter().any(|p| name.starts_with(p))
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if set_for_tests {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}
