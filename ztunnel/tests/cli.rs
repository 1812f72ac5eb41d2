//! Flags out of range are refused at start-up with an error naming the flag, before ztunnel
//! touches the node.

use std::process::Command;

fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel")).args(args).output().expect("running ztunnel");
    assert!(!out.status.success(), "ztunnel accepted {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_plaintext_share_must_be_between_1_and_the_node_cap() {
    for bad in
        [&["--max-plaintext-connections", "0"][..], &["--max-connections", "10", "--max-plaintext-connections", "11"]]
    {
        let err = refused(&[&["--node-name", "node1", "--root-cert", "/nonexistent"][..], bad].concat());
        assert!(err.contains("--max-plaintext-connections") && err.contains("must be between 1 and"), "{bad:?}: {err}");
    }
}

#[test]
fn the_buffer_budgets_must_be_between_1_mib_and_1_tib() {
    for flag in ["--max-inbound-buffer-mib", "--max-outbound-buffer-mib"] {
        for bad in ["0", "1048577", "18446744073709551615"] {
            let err = refused(&["--node-name", "node1", flag, bad]);
            assert!(err.contains(flag) && err.contains("1..=1048576"), "{flag} {bad}: {err}");
        }
    }
}
