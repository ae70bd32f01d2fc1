//! Identifier newtypes shared by the router, the workers and the operator.
//!
//! Every name that crosses a process boundary (a model, a worker, a shard group, a tenant, a
//! session, a cache salt) is its own type, so a map can never be keyed by the wrong kind of string.
//! Invariants, checked on construction and on deserialisation alike: a string id is non-empty (a
//! `CacheSalt` alone may be empty, meaning "shared cache"), at most 253 bytes (512 for a
//! `SessionKey`, which clients choose freely) and free of ASCII control characters. The last rule
//! is load-bearing: the block-hash root separates model name and salt with a 0x00 byte, which is
//! therefore unambiguous. Ids may contain '/' and '%'; the etcd key layout escapes them.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};

/// Why a string was rejected as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty, and this kind of id may not be.
    #[error("{kind} must not be empty")]
    Empty {
        /// The kind of id, e.g. "model name".
        kind: &'static str,
    },
    /// The id is longer than its limit, in UTF-8 bytes.
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// The kind of id.
        kind: &'static str,
        /// The length found, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The id contains an ASCII control character.
    #[error("{kind} contains control character {found:?} at byte {index}")]
    ControlChar {
        /// The kind of id.
        kind: &'static str,
        /// Byte offset of the character.
        index: usize,
        /// The offending character.
        found: char,
    },
}

/// Limit for most ids: the longest DNS subdomain, which also bounds Kubernetes object names.
const NAME_MAX: usize = 253;
/// Limit for session keys, which come from clients (`prompt_cache_key`, `X-Session-Id`, `user`).
const SESSION_KEY_MAX: usize = 512;

fn validate(kind: &'static str, value: &str, max: usize, allow_empty: bool) -> Result<(), IdError> {
    if value.is_empty() && !allow_empty {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if let Some((index, found)) = value.char_indices().find(|(_, c)| c.is_ascii_control()) {
        return Err(IdError::ControlChar { kind, index, found });
    }
    Ok(())
}

/// Declares a validated string newtype; one definition keeps the six ids identical in behaviour.
/// The string is shared (`Arc<str>`): ids are cloned into every request's placement, metrics
/// labels, pins and events, and a clone is then a reference count, not an allocation and copy.
macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident, kind = $kind:literal, max = $max:expr, allow_empty = $empty:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Human name of this kind of id, used in errors.
            pub const KIND: &'static str = $kind;
            /// Longest allowed value, in UTF-8 bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value, $max, $empty)?;
                Ok(Self(value.into()))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Unwraps the id into its string.
            pub fn into_string(self) -> String {
                self.0.to_string()
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}

string_id!(
    /// The served name of a model, e.g. `SmolLM2-135M-Instruct`.
    ModelName, kind = "model name", max = NAME_MAX, allow_empty = false
);
string_id!(
    /// One worker process (in Kubernetes, its pod name).
    WorkerId, kind = "worker id", max = NAME_MAX, allow_empty = false
);
string_id!(
    /// A shard group: the S workers that together serve one replica of a model.
    GroupId, kind = "shard group id", max = NAME_MAX, allow_empty = false
);
string_id!(
    /// A tenant, identified by its API key.
    TenantId, kind = "tenant id", max = NAME_MAX, allow_empty = false
);
string_id!(
    /// A conversation: the unit whose KV cache is kept alive and pinned to a shard group.
    SessionKey, kind = "session key", max = SESSION_KEY_MAX, allow_empty = false
);
string_id!(
    /// Mixed into the root of every block-hash chain so that tenants never share KV blocks unless
    /// they opt in. A tenant's salt is a random secret ([`CacheSalt::generate`]) kept in its
    /// record, never its id or anything else public: whoever knows a salt can compute the block
    /// hashes of any prompt guessed under it. Empty means the unsalted cache, used only by a
    /// worker's own OpenAI surface.
    CacheSalt, kind = "cache salt", max = NAME_MAX, allow_empty = true
);

impl CacheSalt {
    /// Characters of a [`CacheSalt::generate`]d salt: 128 random bits in hex. A tenant record's
    /// salt must be at least this long ([`CacheSalt::is_secret`]).
    pub const SECRET_CHARS: usize = 32;

    /// The unsalted cache (empty): blocks hashed under it are visible to every caller that also
    /// uses it. No tenant record may carry it.
    pub fn shared() -> Self {
        Self(Arc::from(""))
    }

    /// A fresh secret salt: 128 bits from the operating system's random source, in hex.
    pub fn generate() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()).into())
    }

    /// Whether this is the unsalted cache's salt.
    pub fn is_shared(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the salt is long enough to be a secret ([`CacheSalt::SECRET_CHARS`]); what a
    /// tenant record must carry. (Length is all that can be checked: randomness cannot.)
    pub fn is_secret(&self) -> bool {
        self.0.chars().count() >= Self::SECRET_CHARS
    }
}

/// Declares a numeric newtype with `new`/`get`, serialised as the bare number.
macro_rules! number_id {
    ($(#[$meta:meta])* $name:ident($inner:ty)) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name($inner);

        impl $name {
            /// Wraps a raw value.
            pub const fn new(value: $inner) -> Self {
                Self(value)
            }

            /// The raw value.
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

number_id!(
    /// A physical block index inside one worker's KV pool; meaningless on any other worker.
    BlockId(u32)
);
number_id!(
    /// Identifies one run of a worker process. Chosen at random by the worker when it starts, so a
    /// restarted worker never continues an old event sequence.
    Epoch(u64)
);
number_id!(
    /// The position of a worker within its shard group, `0..shard_count`.
    ShardIndex(u32)
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        let model = ModelName::new("SmolLM2-135M-Instruct").unwrap();
        assert_eq!(model.as_str(), "SmolLM2-135M-Instruct");
        assert_eq!(model.to_string(), "SmolLM2-135M-Instruct");
        assert!(
            WorkerId::new("a/b%c").is_ok(),
            "'/' and '%' are escaped by keys, not banned"
        );
        assert!(TenantId::new("ünïcødé").is_ok());
    }

    #[test]
    fn rejects_bad_names_with_kind() {
        assert_eq!(
            ModelName::new(""),
            Err(IdError::Empty { kind: "model name" })
        );
        assert_eq!(
            WorkerId::new("x".repeat(254)),
            Err(IdError::TooLong {
                kind: "worker id",
                len: 254,
                max: 253
            })
        );
        assert!(WorkerId::new("x".repeat(253)).is_ok());
        assert_eq!(
            TenantId::new("a\0b"),
            Err(IdError::ControlChar {
                kind: "tenant id",
                index: 1,
                found: '\0'
            })
        );
        assert!(GroupId::new("tab\there").is_err());
        assert!(GroupId::new("del\u{7f}").is_err());
        let err = ModelName::new("").unwrap_err().to_string();
        assert!(err.contains("model name"), "{err}");
    }

    #[test]
    fn session_keys_may_be_longer() {
        assert!(SessionKey::new("s".repeat(512)).is_ok());
        assert!(SessionKey::new("s".repeat(513)).is_err());
        assert!(SessionKey::new("").is_err());
    }

    #[test]
    fn cache_salt_may_be_empty_and_generated_ones_are_secret() {
        assert!(CacheSalt::new("").is_ok());
        assert!(CacheSalt::shared().is_shared());
        assert!(!CacheSalt::shared().is_secret());
        assert!(!CacheSalt::new("tenant-a").unwrap().is_secret());
        let (a, b) = (CacheSalt::generate(), CacheSalt::generate());
        assert_ne!(a, b, "two salts from the random source");
        for salt in [&a, &b] {
            assert!(salt.is_secret() && !salt.is_shared());
            assert_eq!(salt.as_str().len(), CacheSalt::SECRET_CHARS);
            assert!(salt.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
            assert!(CacheSalt::new(salt.as_str()).is_ok(), "a valid salt");
        }
        assert!(CacheSalt::new("a\nb").is_err());
    }

    #[test]
    fn serde_is_transparent_and_validates() {
        let model = ModelName::new("m").unwrap();
        assert_eq!(serde_json::to_string(&model).unwrap(), "\"m\"");
        assert_eq!(serde_json::from_str::<ModelName>("\"m\"").unwrap(), model);
        assert!(serde_json::from_str::<ModelName>("\"\"").is_err());
        assert!(serde_json::from_str::<SessionKey>("\"a\\u0001\"").is_err());
        assert_eq!(
            serde_json::from_str::<CacheSalt>("\"\"").unwrap(),
            CacheSalt::shared()
        );

        let epoch = Epoch::new(u64::MAX);
        assert_eq!(
            serde_json::to_string(&epoch).unwrap(),
            "18446744073709551615"
        );
        assert_eq!(
            serde_json::from_str::<Epoch>("18446744073709551615").unwrap(),
            epoch
        );
        assert_eq!(serde_json::to_string(&BlockId::new(7)).unwrap(), "7");
        assert_eq!(ShardIndex::new(3).get(), 3);
        assert_eq!(ShardIndex::new(3).to_string(), "3");
    }
}
