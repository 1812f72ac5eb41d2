//! CNI error results: `{cniVersion, code, msg, details}` on stdout, exit status 1.

use serde::Serialize;

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const INVALID_ENV: u32 = 4;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
pub const PLUGIN_UNAVAILABLE: u32 = 50;
/// Plugin-specific codes start at 100.
pub const IPAM_EXHAUSTED: u32 = 100;
pub const NETNS: u32 = 101;
pub const NETLINK: u32 = 102;
pub const IO: u32 = 103;
pub const CHECK_FAILED: u32 = 104;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn details(mut self, d: impl Into<String>) -> CniError {
        self.details = d.into();
        self
    }
}

pub fn io(what: &str, e: std::io::Error) -> CniError {
    CniError::new(IO, format!("{what}: {e}"))
}

pub fn netlink(what: &str, e: rtnetlink::Error) -> CniError {
    CniError::new(NETLINK, format!("{what}: {e}"))
}
