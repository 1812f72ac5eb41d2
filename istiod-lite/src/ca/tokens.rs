//! Per-node bearer tokens. A node's ztunnel presents its token to the CA (and to xDS on :15012);
//! the token binds the request to that node, and the CA then signs only identities of workloads
//! scheduled there. Only SHA-256 hashes are stored, in a 0600 file, so a leaked state dir does not
//! leak usable tokens.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine;
use ring::rand::SecureRandom;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("node name {0:?} is not a valid DNS subdomain")]
    BadNode(String),
    #[error("cannot persist node tokens to {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("system random generator failed")]
    Random,
}

pub struct NodeTokens {
    path: PathBuf,
    hashes: Mutex<BTreeMap<String, String>>,
    /// Bumped by every rotation, so holders of a token (long-lived xDS streams) can re-check it.
    rotations: tokio::sync::watch::Sender<u64>,
}

fn hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl NodeTokens {
    /// Loads the token hashes from `path`; a missing file means no tokens yet.
    pub fn open(path: PathBuf) -> Result<NodeTokens, TokenError> {
        let hashes = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| TokenError::Io { path: path.clone(), err: std::io::Error::other(e) })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(err) => return Err(TokenError::Io { path, err }),
        };
        Ok(NodeTokens { path, hashes: Mutex::new(hashes), rotations: tokio::sync::watch::Sender::new(0) })
    }

    /// Creates or rotates the token of `node`; the previous token stops working.
    pub fn issue(&self, node: &str) -> Result<String, TokenError> {
        let valid = !node.is_empty()
            && node.len() <= 253
            && node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(TokenError::BadNode(node.to_string()));
        }
        let mut secret = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut secret).map_err(|_| TokenError::Random)?;
        let token = format!("{node}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
        let mut hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        // Persisted first: if the write fails, the old token keeps working now and after a
        // restart, instead of failing now and coming back later.
        let mut next = hashes.clone();
        next.insert(node.to_string(), hash(&token));
        let bytes = serde_json::to_vec_pretty(&next).unwrap_or_default();
        crate::secrets::write_private(&self.path, &bytes)
            .map_err(|err| TokenError::Io { path: self.path.clone(), err })?;
        *hashes = next;
        drop(hashes);
        self.rotations.send_modify(|n| *n += 1);
        Ok(token)
    }

    /// Resolves once `token` no longer verifies, that is when its node's token is rotated.
    /// A stream authenticated by a token must not outlive it: rotation is how an operator
    /// revokes a node's access.
    pub async fn revoked(&self, token: &str) {
        // Subscribed before the first check, so a rotation between the two is not missed.
        let mut rotations = self.rotations.subscribe();
        while self.verify(token).is_some() {
            if rotations.changed().await.is_err() {
                // The sender lives in `self`, which outlives this borrow: unreachable in practice.
                return std::future::pending().await;
            }
        }
    }

    /// Returns the node a token belongs to, or `None` if it is not a current token.
    pub fn verify(&self, token: &str) -> Option<String> {
        let (node, _) = token.rsplit_once('.')?;
        let hashes = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        let want = hashes.get(node)?;
        // Comparing hashes, not tokens, so timing reveals nothing about the secret.
        (hash(token) == *want).then(|| node.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_rotation_revokes() {
        let dir = tempfile::tempdir().unwrap();
        let t = NodeTokens::open(dir.path().join("tokens.json")).unwrap();
        let a = t.issue("node1").unwrap();
        assert_eq!(t.verify(&a).as_deref(), Some("node1"));
        assert_eq!(t.verify("node1.forged"), None);
        let b = t.issue("node1").unwrap();
        assert_eq!(t.verify(&a), None);
        assert_eq!(t.verify(&b).as_deref(), Some("node1"));
        let reopened = NodeTokens::open(dir.path().join("tokens.json")).unwrap();
        assert_eq!(reopened.verify(&b).as_deref(), Some("node1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tokens.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(t.issue("Bad_Node").is_err());
    }

    #[test]
    fn a_rotation_that_cannot_be_saved_leaves_the_old_token_working() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let t = NodeTokens::open(dir.path().join("state").join("tokens.json")).unwrap();
        let a = t.issue("node1").unwrap();
        std::fs::remove_dir_all(dir.path().join("state")).unwrap();
        assert!(t.issue("node1").is_err(), "nowhere to save it");
        assert_eq!(t.verify(&a).as_deref(), Some("node1"), "the saved token still works");
    }

    #[tokio::test]
    async fn revoked_resolves_on_the_rotation_of_that_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::sync::Arc::new(NodeTokens::open(dir.path().join("tokens.json")).unwrap());
        let a = t.issue("node1").unwrap();
        let watcher = tokio::spawn({
            let (t, a) = (t.clone(), a.clone());
            async move { t.revoked(&a).await }
        });
        t.issue("node2").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!watcher.is_finished(), "another node's rotation leaves node1's token valid");
        t.issue("node1").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher).await.unwrap().unwrap();
        // A token that is already invalid resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), t.revoked(&a)).await.unwrap();
    }
}
