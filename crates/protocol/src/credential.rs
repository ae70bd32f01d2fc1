//! The cluster credential: the bearer token every internal route of workers and shards requires
//! (DESIGN.md, "Worker API"). Routers and shard peers hold it; tenants never see it.
//!
//! A token is a long random string (at least [`ClusterToken::MIN_CHARS`] visible ASCII
//! characters; [`ClusterToken::generate`] gives 256 bits). It is compared in constant time: the
//! presented value is hashed with BLAKE3 and the hashes compared with [`blake3::Hash`]'s
//! constant-time equality, so response time says nothing about how much of a guess was right.
//! `Debug` never prints it.

use std::fmt;
use std::path::Path;

/// The bearer token of the internal APIs.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken {
    token: String,
    hash: blake3::Hash,
}

/// Why a string or file is not a cluster token.
#[derive(Debug, thiserror::Error)]
pub enum ClusterTokenError {
    #[error(
        "a cluster token must be at least {min} characters (it has {0}); generate one with \
         `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`",
        min = ClusterToken::MIN_CHARS
    )]
    TooShort(usize),
    #[error(
        "a cluster token must be visible ASCII characters only (no spaces or control characters)"
    )]
    BadCharacter,
    #[error("cannot read the cluster token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClusterToken {
    /// The shortest token accepted.
    pub const MIN_CHARS: usize = 32;

    /// A token from its text; surrounding whitespace (a file's final newline) is dropped.
    pub fn new(text: &str) -> Result<Self, ClusterTokenError> {
        let token = text.trim();
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClusterTokenError::BadCharacter);
        }
        if token.len() < Self::MIN_CHARS {
            return Err(ClusterTokenError::TooShort(token.len()));
        }
        Ok(ClusterToken {
            token: token.to_owned(),
            hash: blake3::hash(token.as_bytes()),
        })
    }

    /// A fresh token: 256 bits from the operating system's random source, in hex.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self::new(&hex::encode(bytes)).expect("64 hex digits are a valid token")
    }

    /// The token in a file (a mounted Secret, or `tidelock up`'s private file).
    pub fn from_file(path: &Path) -> Result<Self, ClusterTokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterTokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&text)
    }

    /// The token itself, for writing it where its holders read it.
    pub fn expose(&self) -> &str {
        &self.token
    }

    /// The `Authorization` header value that carries it.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Whether an `Authorization` header value carries this token (constant time).
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        let presented = authorization
            .strip_prefix(b"Bearer ")
            .unwrap_or(b"")
            .trim_ascii();
        // `blake3::Hash`'s equality is constant time.
        blake3::hash(presented) == self.hash
    }
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_visible_and_compared_whole() {
        let token = ClusterToken::generate();
        assert_eq!(token.expose().len(), 64);
        assert_ne!(token, ClusterToken::generate());
        assert!(token.accepts(token.authorization().as_bytes()));
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        assert!(token.accepts(&bearer(&format!(" {} ", token.expose()))));
        assert!(!token.accepts(token.expose().as_bytes()), "no scheme");
        assert!(!token.accepts(&bearer(&token.expose()[..63])), "a prefix");
        assert!(!token.accepts(&bearer(&format!("{}0", token.expose()))));
        assert!(!token.accepts(b"Bearer "));
        assert!(!token.accepts(b""));
        assert!(!format!("{token:?}").contains(token.expose()));

        assert!(matches!(
            ClusterToken::new("short"),
            Err(ClusterTokenError::TooShort(5))
        ));
        assert!(matches!(
            ClusterToken::new(&format!("{} x", "a".repeat(40))),
            Err(ClusterTokenError::BadCharacter)
        ));
        let from_text = ClusterToken::new(&format!("{}\n", token.expose())).unwrap();
        assert_eq!(from_text, token);

        let dir = std::env::temp_dir().join(format!("tidelock-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, format!("{}\n", token.expose())).unwrap();
        assert_eq!(ClusterToken::from_file(&file).unwrap(), token);
        let missing = ClusterToken::from_file(&dir.join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
