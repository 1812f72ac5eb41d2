//! Small helpers shared by the rtnetlink users (the overlay and the eBPF capture's policy route).

/// The kernel's errno of a failed request (negative, like `-libc::EEXIST`), or 0.
pub fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code(),
        _ => 0,
    }
}
