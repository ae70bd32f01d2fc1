//! The block-hash chain rule: the one place where token ids become cache identities.
//!
//! A prompt is cut into blocks of `block_tokens` tokens; each full block is named by a 128-bit
//! [`BlockHash`] that commits to the block's tokens and, through its parent, to every token before
//! it. The router hashes prompts to look blocks up in its KV index; workers hash the same prompts to
//! name the blocks they store. Both must agree bit for bit, so the encoding is fixed here:
//!
//! - root parent = first 16 bytes of BLAKE3(`b"tidelock/v1"` || model name (UTF-8) || `0x00` ||
//!   cache salt (UTF-8)). Ids never contain control characters, so the `0x00` separator makes the
//!   (model, salt) pair unambiguous.
//! - block hash = first 16 bytes of BLAKE3(parent (16 bytes) || each token id as u32
//!   little-endian).
//!
//! Only full blocks are hashed; a trailing partial block has no hash. BLAKE3 rather than a fast
//! non-cryptographic hash: a crafted collision would serve one tenant's cache to another. The golden
//! vectors in the tests pin the rule; they were produced independently by
//! `tests/golden/gen_golden.py`, and changing them is a contract change.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{CacheSalt, ModelName};

/// Domain-separation prefix of every root; bump the version to change the rule.
const ROOT_DOMAIN: &[u8] = b"tidelock/v1";
/// Length of a block hash in bytes.
const HASH_LEN: usize = 16;
/// Tokens encoded per `Hasher::update` call: batches the little-endian encoding on the stack.
const ENCODE_CHUNK: usize = 256;

/// Why a block size or a block-hash string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// `block_tokens` is not a power of two in `1..=1024`.
    #[error("block_tokens must be a power of two between 1 and 1024, got {0}")]
    InvalidBlockTokens(u32),
    /// A block-hash string does not have 32 characters.
    #[error("a block hash is 32 lowercase hex characters, got {len} bytes")]
    HexLength {
        /// The length found, in bytes.
        len: usize,
    },
    /// A block-hash string contains something other than `0-9a-f`.
    #[error("a block hash is 32 lowercase hex characters, found {found:?} at byte {index}")]
    HexChar {
        /// Byte offset of the offending character.
        index: usize,
        /// The offending byte, as a char.
        found: char,
    },
}

/// The identity of one full block of tokens in one (model, cache salt) namespace.
///
/// Displayed, debugged and serialised as 32 lowercase hex characters. Parsing accepts only that
/// canonical form, so two equal hashes always have equal strings (in logs, keys and JSON).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash([u8; HASH_LEN]);

impl BlockHash {
    /// Wraps raw hash bytes.
    pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw hash bytes.
    pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }

    /// The parent of the first block of every prompt of `model` under `salt`.
    pub fn root(model: &ModelName, salt: &CacheSalt) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(ROOT_DOMAIN);
        hasher.update(model.as_str().as_bytes());
        hasher.update(&[0x00]);
        hasher.update(salt.as_str().as_bytes());
        Self::truncate(&hasher)
    }

    /// The hash of the block holding `tokens` whose preceding block hashed to `parent` (or whose
    /// parent is the root).
    pub fn chain(parent: BlockHash, tokens: &[u32]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&parent.0);
        let mut buf = [0u8; ENCODE_CHUNK * 4];
        for chunk in tokens.chunks(ENCODE_CHUNK) {
            for (slot, token) in buf.chunks_exact_mut(4).zip(chunk) {
                slot.copy_from_slice(&token.to_le_bytes());
            }
            hasher.update(&buf[..chunk.len() * 4]);
        }
        Self::truncate(&hasher)
    }

    /// The canonical 32-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn truncate(hasher: &blake3::Hasher) -> Self {
        let digest = hasher.finalize();
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(&digest.as_bytes()[..HASH_LEN]);
        Self(out)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for BlockHash {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, HashError> {
        let bytes = s.as_bytes();
        if bytes.len() != HASH_LEN * 2 {
            return Err(HashError::HexLength { len: bytes.len() });
        }
        let nibble = |index: usize| -> Result<u8, HashError> {
            match bytes[index] {
                b @ b'0'..=b'9' => Ok(b - b'0'),
                b @ b'a'..=b'f' => Ok(b - b'a' + 10),
                b => Err(HashError::HexChar {
                    index,
                    found: char::from(b),
                }),
            }
        };
        let mut out = [0u8; HASH_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = (nibble(2 * i)? << 4) | nibble(2 * i + 1)?;
        }
        Ok(Self(out))
    }
}

impl Serialize for BlockHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlockHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HexVisitor;

        impl Visitor<'_> for HexVisitor {
            type Value = BlockHash;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a block hash as 32 lowercase hex characters")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<BlockHash, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(HexVisitor)
    }
}

/// Tokens per block: a power of two in `1..=1024`, a property of the Model reported by each worker.
///
/// Serialised as the bare number; deserialisation validates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockTokens(NonZeroU32);

impl BlockTokens {
    /// The largest allowed block size.
    pub const MAX: u32 = 1024;

    /// The default block size, 64 tokens.
    pub const DEFAULT: Self = match Self::checked(64) {
        Some(tokens) => tokens,
        None => panic!("64 is a valid block size"),
    };

    /// Validates `tokens` as a block size.
    pub fn new(tokens: u32) -> Result<Self, HashError> {
        Self::checked(tokens).ok_or(HashError::InvalidBlockTokens(tokens))
    }

    const fn checked(tokens: u32) -> Option<Self> {
        if tokens > Self::MAX || !tokens.is_power_of_two() {
            return None;
        }
        match NonZeroU32::new(tokens) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }

    /// The block size as a number.
    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// The block size as a `usize`, for slicing token arrays.
    pub const fn as_usize(self) -> usize {
        self.0.get() as usize
    }

    /// How many full blocks `tokens` tokens make; the partial rest is not cached.
    pub const fn full_blocks(self, tokens: usize) -> usize {
        tokens / self.as_usize()
    }
}

impl Default for BlockTokens {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for BlockTokens {
    type Error = HashError;

    fn try_from(tokens: u32) -> Result<Self, HashError> {
        Self::new(tokens)
    }
}

impl From<BlockTokens> for u32 {
    fn from(tokens: BlockTokens) -> u32 {
        tokens.get()
    }
}

impl fmt::Display for BlockTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The hashes of every full block of `tokens`, in order; a trailing partial block is not hashed.
pub fn block_hashes(
    model: &ModelName,
    salt: &CacheSalt,
    tokens: &[u32],
    block_tokens: BlockTokens,
) -> Vec<BlockHash> {
    let mut parent = BlockHash::root(model, salt);
    tokens
        .chunks_exact(block_tokens.as_usize())
        .map(|block| {
            parent = BlockHash::chain(parent, block);
            parent
        })
        .collect()
}

/// A session's hash chain, extended turn by turn without rehashing what came before.
///
/// Invariant: after any sequence of `extend` calls, `hashes()` equals [`block_hashes`] over the
/// concatenation of every extended slice, and `pending()` holds the tokens after the last full
/// block (always fewer than `block_tokens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashChain {
    root: BlockHash,
    block_tokens: BlockTokens,
    hashes: Vec<BlockHash>,
    pending: Vec<u32>,
}

impl HashChain {
    /// An empty chain for `model` under `salt`.
    pub fn new(model: &ModelName, salt: &CacheSalt, block_tokens: BlockTokens) -> Self {
        Self {
            root: BlockHash::root(model, salt),
            block_tokens,
            hashes: Vec::new(),
            pending: Vec::with_capacity(block_tokens.as_usize()),
        }
    }

    /// Appends `tokens` and hashes every block they complete.
    pub fn extend(&mut self, mut tokens: &[u32]) {
        let block = self.block_tokens.as_usize();
        if !self.pending.is_empty() {
            let missing = block - self.pending.len();
            if tokens.len() < missing {
                self.pending.extend_from_slice(tokens);
                return;
            }
            let (head, rest) = tokens.split_at(missing);
            self.pending.extend_from_slice(head);
            let hash = BlockHash::chain(self.tip(), &self.pending);
            self.hashes.push(hash);
            self.pending.clear();
            tokens = rest;
        }
        let mut blocks = tokens.chunks_exact(block);
        for full in &mut blocks {
            let hash = BlockHash::chain(self.tip(), full);
            self.hashes.push(hash);
        }
        self.pending.extend_from_slice(blocks.remainder());
    }

    /// The hashes of all full blocks so far.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }

    /// The tokens of the incomplete last block.
    pub fn pending(&self) -> &[u32] {
        &self.pending
    }

    /// The parent of the next block: the last full block's hash, or the root if there is none.
    pub fn tip(&self) -> BlockHash {
        self.hashes.last().copied().unwrap_or(self.root)
    }

    /// The root this chain starts from.
    pub fn root(&self) -> BlockHash {
        self.root
    }

    /// The block size of this chain.
    pub fn block_tokens(&self) -> BlockTokens {
        self.block_tokens
    }

    /// Total tokens extended so far, hashed or pending.
    pub fn token_count(&self) -> usize {
        self.hashes.len() * self.block_tokens.as_usize() + self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelName {
        ModelName::new(name).unwrap()
    }

    fn salt(value: &str) -> CacheSalt {
        CacheSalt::new(value).unwrap()
    }

    fn hash(hex: &str) -> BlockHash {
        hex.parse().unwrap()
    }

    fn bt(n: u32) -> BlockTokens {
        BlockTokens::new(n).unwrap()
    }

    // Golden vectors: produced by tests/golden/gen_golden.py (Python `blake3`, bytes built by
    // hand). A failure here means the hash rule changed, which is a contract change.

    const SMOL: &str = "SmolLM2-135M-Instruct";

    #[test]
    fn golden_roots() {
        assert_eq!(
            BlockHash::root(&model(SMOL), &CacheSalt::shared()),
            hash("cc57e8627d1258d7cf61b7db4f0ad4e8")
        );
        assert_eq!(
            BlockHash::root(&model(SMOL), &salt("tenant-a")),
            hash("e498eeec306539942914285b72b196e0")
        );
        assert_eq!(
            BlockHash::root(&model("m"), &salt("s")),
            hash("45fef986c5c72c9b0a4c0a583176c451")
        );
        assert_eq!(
            BlockHash::root(&model("ab"), &salt("c")),
            hash("4a74ff98f6a6c3cf92febb0b59792c6f")
        );
        assert_eq!(
            BlockHash::root(&model("a"), &salt("bc")),
            hash("cbe02be33a6170dd0477cd1848dc8f54")
        );
    }

    #[test]
    fn golden_chain_of_one_block() {
        let cases = [
            ("", "e7ea8508311272a3fad9d8176b3715fe"),
            ("tenant-a", "ae08d040c1de0e985fe74eea12ecb88f"),
        ];
        for (salt_value, expected) in cases {
            let root = BlockHash::root(&model(SMOL), &salt(salt_value));
            assert_eq!(BlockHash::chain(root, &[1, 2, 3, 4]), hash(expected));
            assert_eq!(
                block_hashes(&model(SMOL), &salt(salt_value), &[1, 2, 3, 4], bt(4)),
                vec![hash(expected)],
                "salt {salt_value:?}"
            );
        }
    }

    #[test]
    fn golden_block_hashes_skip_partial_block() {
        let tokens: Vec<u32> = (0..130).collect();
        assert_eq!(
            block_hashes(&model("m"), &salt("s"), &tokens, BlockTokens::DEFAULT),
            vec![
                hash("18885d6555f25c4d3bd87bb791c7e7e3"),
                hash("404b772f7fc6ea38fe8e0812ccdd33fc"),
            ]
        );
    }

    #[test]
    fn golden_wide_tokens_pin_byte_order() {
        let tokens = [0x0102_0304, u32::MAX, 0, 1 << 24];
        assert_eq!(
            block_hashes(&model("m"), &salt("s"), &tokens, bt(4)),
            vec![hash("69634f321986ff4abcfad72db17fef3c")]
        );
    }

    #[test]
    fn salts_and_boundaries_separate_roots() {
        let m = model(SMOL);
        let shared = BlockHash::root(&m, &CacheSalt::shared());
        let a = BlockHash::root(&m, &salt("tenant-a"));
        let b = BlockHash::root(&m, &salt("tenant-b"));
        assert_ne!(shared, a);
        assert_ne!(a, b);
        assert_ne!(
            BlockHash::root(&model("ab"), &salt("c")),
            BlockHash::root(&model("a"), &salt("bc"))
        );
    }

    #[test]
    fn chain_encodes_long_blocks_like_short_ones() {
        // The encoder batches tokens on the stack; a block longer than one batch must hash the
        // same as feeding the hasher token by token.
        let root = BlockHash::root(&model("m"), &salt("s"));
        let tokens: Vec<u32> = (0..1024u32)
            .map(|t| t.wrapping_mul(2_654_435_761))
            .collect();
        let mut reference = blake3::Hasher::new();
        reference.update(root.as_bytes());
        for t in &tokens {
            reference.update(&t.to_le_bytes());
        }
        assert_eq!(
            BlockHash::chain(root, &tokens).as_bytes()[..],
            reference.finalize().as_bytes()[..16]
        );
    }

    #[test]
    fn hash_text_forms() {
        let h = hash("0123456789abcdef0011223344556677");
        assert_eq!(h.to_string(), "0123456789abcdef0011223344556677");
        assert_eq!(format!("{h:?}"), "0123456789abcdef0011223344556677");
        assert_eq!(h.to_hex(), h.to_string());
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, "\"0123456789abcdef0011223344556677\"");
        assert_eq!(serde_json::from_str::<BlockHash>(&json).unwrap(), h);

        assert_eq!(
            "0123".parse::<BlockHash>(),
            Err(HashError::HexLength { len: 4 })
        );
        assert_eq!(
            "0123456789ABCDEF0011223344556677".parse::<BlockHash>(),
            Err(HashError::HexChar {
                index: 10,
                found: 'A'
            })
        );
        assert!(serde_json::from_str::<BlockHash>("\"zz\"").is_err());
        assert!(serde_json::from_str::<BlockHash>("17").is_err());
    }

    #[test]
    fn block_tokens_validation() {
        for ok in [1, 2, 16, 64, 128, 1024] {
            assert_eq!(bt(ok).get(), ok);
        }
        for bad in [0, 3, 48, 100, 2048, u32::MAX] {
            assert_eq!(
                BlockTokens::new(bad),
                Err(HashError::InvalidBlockTokens(bad))
            );
        }
        assert_eq!(BlockTokens::DEFAULT.get(), 64);
        assert_eq!(BlockTokens::default(), BlockTokens::DEFAULT);
        assert_eq!(BlockTokens::DEFAULT.full_blocks(130), 2);
        assert_eq!(serde_json::to_string(&bt(16)).unwrap(), "16");
        assert_eq!(serde_json::from_str::<BlockTokens>("128").unwrap(), bt(128));
        assert!(serde_json::from_str::<BlockTokens>("96").is_err());
        assert!(serde_json::from_str::<BlockTokens>("0").is_err());
    }

    #[test]
    fn extend_at_every_split_point_matches_block_hashes() {
        let (m, s) = (model("m"), salt("s"));
        let tokens: Vec<u32> = (0..23).map(|t| t * 7 + 1).collect();
        let block = bt(4);
        let expected = block_hashes(&m, &s, &tokens, block);
        assert_eq!(expected.len(), 5);
        for split in 0..=tokens.len() {
            let mut chain = HashChain::new(&m, &s, block);
            chain.extend(&tokens[..split]);
            chain.extend(&tokens[split..]);
            assert_eq!(chain.hashes(), &expected[..], "split at {split}");
            assert_eq!(chain.pending(), &tokens[20..], "split at {split}");
            assert_eq!(chain.token_count(), tokens.len());
        }
        for first in 0..=tokens.len() {
            for second in first..=tokens.len() {
                let mut chain = HashChain::new(&m, &s, block);
                chain.extend(&tokens[..first]);
                chain.extend(&tokens[first..second]);
                chain.extend(&tokens[second..]);
                assert_eq!(chain.hashes(), &expected[..], "splits at {first}, {second}");
            }
        }
    }

    #[test]
    fn extend_in_turns_and_token_by_token() {
        let (m, s) = (model("SmolLM2-135M-Instruct"), salt("tenant-a"));
        let tokens: Vec<u32> = (0..300).map(|t| t ^ 0xdead_beef).collect();
        let expected = block_hashes(&m, &s, &tokens, BlockTokens::DEFAULT);

        let mut turns = HashChain::new(&m, &s, BlockTokens::DEFAULT);
        for turn in [
            &tokens[..10],
            &tokens[10..70],
            &tokens[70..200],
            &tokens[200..],
        ] {
            turns.extend(turn);
        }
        assert_eq!(turns.hashes(), &expected[..]);
        assert_eq!(turns.pending(), &tokens[256..]);

        let mut single = HashChain::new(&m, &s, BlockTokens::DEFAULT);
        assert_eq!(single.tip(), single.root());
        for t in &tokens {
            single.extend(std::slice::from_ref(t));
        }
        assert_eq!(single, turns);
        assert_eq!(single.tip(), expected[3]);
    }
}
