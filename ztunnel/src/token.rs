//! The node's bearer token for istiod-lite (`--token-file`).
//!
//! The file is read again for every xDS connection and certificate request, so an operator
//! rotates a node's token by writing the new one to the file (`meshctl create token node N >
//! FILE`); no restart is needed. istiod-lite ends the streams of a rotated token, and the
//! reconnect then presents the new one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Tokens are about 60 bytes; a larger file is not a token.
const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Clone, Default)]
pub struct NodeToken {
    source: Option<Source>,
}

/// Names where the token comes from, never the token: configs holding it are logged.
impl std::fmt::Debug for NodeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            None => f.write_str("NodeToken(none)"),
            Some(Source::Fixed(_)) => f.write_str("NodeToken(<redacted>)"),
            Some(Source::File(path, _)) => write!(f, "NodeToken(file {})", path.display()),
        }
    }
}

#[derive(Clone)]
enum Source {
    Fixed(String),
    /// The file, and the last token read from it.
    File(PathBuf, Arc<Mutex<String>>),
}

fn read(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!("longer than {MAX_TOKEN_FILE} bytes"));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err("empty".into());
    }
    Ok(token.to_string())
}

impl NodeToken {
    /// No token (the plaintext xDS port).
    pub fn none() -> NodeToken {
        NodeToken { source: None }
    }

    pub fn fixed(token: impl Into<String>) -> NodeToken {
        NodeToken { source: Some(Source::Fixed(token.into())) }
    }

    /// Reads the file now: a token file that is missing or empty at startup is an error.
    pub fn from_file(path: &Path) -> Result<NodeToken, String> {
        let token = read(path).map_err(|e| format!("--token-file {}: {e}", path.display()))?;
        Ok(NodeToken { source: Some(Source::File(path.to_path_buf(), Arc::new(Mutex::new(token)))) })
    }

    /// The token to present now. A file that cannot be read (being replaced, say) leaves the
    /// last token read in use, with a warning: it is still the best credential ztunnel has.
    pub fn current(&self) -> Option<String> {
        match self.source.as_ref()? {
            Source::Fixed(t) => Some(t.clone()),
            Source::File(path, last) => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                match read(path) {
                    Ok(t) => *last = t,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = e, "cannot read the node token; using the last one read")
                    }
                }
                Some(last.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_read_on_every_use_and_a_bad_read_keeps_the_last_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(NodeToken::from_file(&path).unwrap_err().contains("token"), "missing at startup");
        std::fs::write(&path, "\n").unwrap();
        assert!(NodeToken::from_file(&path).unwrap_err().contains("empty"));

        std::fs::write(&path, "node1.first\n").unwrap();
        let t = NodeToken::from_file(&path).unwrap();
        assert_eq!(t.current().as_deref(), Some("node1.first"));
        std::fs::write(&path, "node1.second").unwrap();
        assert_eq!(t.current().as_deref(), Some("node1.second"), "a rotation needs no restart");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(t.current().as_deref(), Some("node1.second"));
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        assert_eq!(t.current().as_deref(), Some("node1.second"), "an oversized file is not a token");

        assert_eq!(NodeToken::none().current(), None);
        assert_eq!(NodeToken::fixed("a.b").current().as_deref(), Some("a.b"));
        assert!(!format!("{:?}", NodeToken::fixed("node1.secret")).contains("secret"), "never logged");
    }
}
