//! KV blocks at rest and in transit (issue #21): one format for the files of a worker's disk
//! tier and for blocks pulled from a peer worker.
//!
//! ```text
//! body   "TLKB" u16 version=1 u16 kind=1
//!        layout { u32 layers  u32 kv_heads  u32 head_dim  u32 block_tokens  u8 dtype  u8 arrangement  u16 0 }
//!        u32 n
//!        n x { [16] hash  u64 len  [len] payload  [16] checksum }
//! ```
//!
//! A block's payload is its keys and values over every layer in the layout the sending worker
//! keeps them in ([`Arrangement`]), raw little-endian numbers of [`KvDtype`]: it is copied into
//! a store, never interpreted, so both ends must have the same layout (a worker refuses another
//! one as a miss). The checksum is the first 16 bytes of BLAKE3 over the layout, the block's hash
//! and its payload: it binds the bytes to the prefix they claim to hold, so a damaged block, or
//! one filed under another hash, is found on load and counted as a miss, never served. Hashes
//! are salted per tenant ([`crate::hash`]), so a block pulled or loaded under its hash can only
//! ever serve the tenant whose salt made that hash.

use crate::BlockHash;
use crate::binary::{Format, Reader, WireError, Writer};

const FORMAT: Format = Format {
    magic: *b"TLKB",
    version: 1,
    name: "KV block",
};
const KIND_BLOCKS: u16 = 1;
/// Bytes of the layout as encoded.
const LAYOUT_BYTES: usize = 20;
/// Bytes before the first block: header, layout and count.
pub const PREFIX_BYTES: usize = 8 + LAYOUT_BYTES + 4;
/// Bytes of a block's checksum.
pub const CHECKSUM_BYTES: usize = 16;
/// Bytes of a one-block body before its payload: the prefix, the hash and the length.
pub const BLOCK_HEAD_BYTES: usize = PREFIX_BYTES + 16 + 8;

/// The number type of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::F16 => 1,
            KvDtype::Bf16 => 2,
        }
    }

    fn from_code(code: u8) -> Result<Self, WireError> {
        Ok(match code {
            0 => KvDtype::F32,
            1 => KvDtype::F16,
            2 => KvDtype::Bf16,
            other => return Err(WireError::Invalid(format!("KV dtype code {other}"))),
        })
    }
}

/// How a payload orders one block's numbers, per layer, keys then values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arrangement {
    /// The host store's pages: values `[kv_head][slot][head_dim]`, keys `[kv_head][head_dim][slot]`.
    HeadMajor,
    /// A device store's rows: keys and values `[slot][kv_head * head_dim]`.
    TokenMajor,
}

impl Arrangement {
    fn code(self) -> u8 {
        match self {
            Arrangement::HeadMajor => 0,
            Arrangement::TokenMajor => 1,
        }
    }

    fn from_code(code: u8) -> Result<Self, WireError> {
        Ok(match code {
            0 => Arrangement::HeadMajor,
            1 => Arrangement::TokenMajor,
            other => return Err(WireError::Invalid(format!("KV arrangement code {other}"))),
        })
    }
}

/// What one block's payload holds and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub block_tokens: u32,
    pub dtype: KvDtype,
    pub arrangement: Arrangement,
}

impl BlockLayout {
    /// Bytes of one block's payload: keys and values of every layer.
    pub fn payload_bytes(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.block_tokens)
            * self.dtype.size() as u64
    }

    /// Bytes of a body holding `n` blocks.
    pub fn body_bytes(&self, n: usize) -> u64 {
        PREFIX_BYTES as u64 + n as u64 * (16 + 8 + self.payload_bytes() + CHECKSUM_BYTES as u64)
    }

    fn encode(&self) -> [u8; LAYOUT_BYTES] {
        let mut out = [0u8; LAYOUT_BYTES];
        for (i, v) in [self.layers, self.kv_heads, self.head_dim, self.block_tokens]
            .into_iter()
            .enumerate()
        {
            out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        out[16] = self.dtype.code();
        out[17] = self.arrangement.code();
        out
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let layout = BlockLayout {
            layers: r.u32()?,
            kv_heads: r.u32()?,
            head_dim: r.u32()?,
            block_tokens: r.u32()?,
            dtype: KvDtype::from_code(r.u8()?)?,
            arrangement: Arrangement::from_code(r.u8()?)?,
        };
        if r.u16()? != 0 {
            return Err(WireError::Invalid(
                "reserved layout bytes are not zero".into(),
            ));
        }
        if layout.payload_bytes() == 0 {
            return Err(WireError::Invalid(format!("an empty layout: {layout:?}")));
        }
        Ok(layout)
    }
}

/// The checksum of one block.
pub fn checksum(layout: &BlockLayout, hash: &BlockHash, payload: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(&layout.encode());
    h.update(hash.as_bytes());
    h.update(payload);
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECKSUM_BYTES]);
    out
}

/// Encodes blocks (hash and payload) of `layout`. Every payload must have the layout's size.
pub fn encode(layout: &BlockLayout, blocks: &[(BlockHash, &[u8])]) -> Result<Vec<u8>, WireError> {
    let want = layout.payload_bytes();
    if let Some((hash, payload)) = blocks.iter().find(|(_, p)| p.len() as u64 != want) {
        return Err(WireError::Invalid(format!(
            "block {hash}: {} payload bytes, the layout has {want}",
            payload.len()
        )));
    }
    let size = usize::try_from(layout.body_bytes(blocks.len()))
        .map_err(|_| WireError::Invalid("too many blocks".into()))?;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&encode_prefix(layout, blocks.len())?);
    for (hash, payload) in blocks {
        out.extend_from_slice(&block_prefix(hash, payload.len() as u64));
        out.extend_from_slice(payload);
        out.extend_from_slice(&checksum(layout, hash, payload));
    }
    Ok(out)
}

/// The first [`PREFIX_BYTES`] of a body of `n` blocks: header, layout and count. A sender that
/// streams a body sends this, then per block [`block_prefix`], the payload and [`checksum`].
pub fn encode_prefix(layout: &BlockLayout, n: usize) -> Result<Vec<u8>, WireError> {
    let mut w = Writer::header(&FORMAT, KIND_BLOCKS, PREFIX_BYTES);
    w.bytes(&layout.encode());
    w.u32(u32::try_from(n).map_err(|_| WireError::Invalid("too many blocks".into()))?);
    Ok(w.0)
}

/// The bytes before one block's payload: its hash and the payload's length.
pub fn block_prefix(hash: &BlockHash, len: u64) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(hash.as_bytes());
    out[16..].copy_from_slice(&len.to_le_bytes());
    out
}

/// Reads [`encode_prefix`]'s bytes: the layout and the number of blocks that follow.
pub fn parse_prefix(prefix: &[u8]) -> Result<(BlockLayout, u32), WireError> {
    let mut r = Reader(prefix);
    r.header(&FORMAT, KIND_BLOCKS, "KV blocks")?;
    let layout = BlockLayout::decode(&mut r)?;
    let n = r.u32()?;
    r.end()?;
    Ok((layout, n))
}

/// Reads [`block_prefix`]'s bytes; the length must be the layout's payload size.
pub fn parse_block_prefix(
    layout: &BlockLayout,
    prefix: &[u8],
) -> Result<(BlockHash, u64), WireError> {
    let mut r = Reader(prefix);
    let hash = BlockHash::from_bytes(r.array()?);
    let len = r.u64()?;
    r.end()?;
    if len != layout.payload_bytes() {
        return Err(WireError::Invalid(format!(
            "block {hash}: {len} payload bytes, the layout has {}",
            layout.payload_bytes()
        )));
    }
    Ok((hash, len))
}

/// A decoded body: the blocks whose checksum holds, and the hashes of those whose does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub layout: BlockLayout,
    /// Good blocks, in body order, borrowing their payload from the body.
    pub blocks: Vec<(BlockHash, &'a [u8])>,
    /// Blocks whose bytes do not match their checksum: misses, never served.
    pub damaged: Vec<BlockHash>,
}

/// Decodes a body. A structural fault (bad header, lengths past the end, a payload of the wrong
/// size) is an error for the whole body; a block whose checksum fails is listed in `damaged`.
pub fn decode(body: &[u8]) -> Result<Decoded<'_>, WireError> {
    let mut r = Reader(body);
    r.header(&FORMAT, KIND_BLOCKS, "KV blocks")?;
    let layout = BlockLayout::decode(&mut r)?;
    let n = r.u32()?;
    let per_block = 16 + 8 + layout.payload_bytes() + CHECKSUM_BYTES as u64;
    r.fits(n, per_block)?;
    let mut out = Decoded {
        layout,
        blocks: Vec::with_capacity(n as usize),
        damaged: Vec::new(),
    };
    for _ in 0..n {
        let hash = BlockHash::from_bytes(r.array()?);
        let len = r.u64()?;
        if len != layout.payload_bytes() {
            return Err(WireError::Invalid(format!(
                "block {hash}: {len} payload bytes, the layout has {}",
                layout.payload_bytes()
            )));
        }
        let payload = r.take(len as usize)?;
        let sum: [u8; CHECKSUM_BYTES] = r.array()?;
        if sum == checksum(&layout, &hash, payload) {
            out.blocks.push((hash, payload));
        } else {
            out.damaged.push(hash);
        }
    }
    r.end()?;
    Ok(out)
}

/// What the first [`BLOCK_HEAD_BYTES`] of a one-block body say: its layout, hash and payload
/// length (the payload and its checksum follow), so a reader can read the payload straight
/// into its own buffer and check it with [`checksum`].
pub fn block_head(head: &[u8]) -> Result<(BlockLayout, BlockHash, u64), WireError> {
    let mut r = Reader(head);
    r.header(&FORMAT, KIND_BLOCKS, "KV blocks")?;
    let layout = BlockLayout::decode(&mut r)?;
    if r.u32()? != 1 {
        return Err(WireError::Invalid("not a one-block body".into()));
    }
    let hash = BlockHash::from_bytes(r.array()?);
    let len = r.u64()?;
    if len != layout.payload_bytes() {
        return Err(WireError::Invalid(format!(
            "block {hash}: {len} payload bytes, the layout has {}",
            layout.payload_bytes()
        )));
    }
    Ok((layout, hash, len))
}

/// The layout and first block hash of a body, from its first [`PREFIX_BYTES`] + 16 bytes (a
/// disk tier rebuilding its index reads no more of each file).
pub fn peek(prefix: &[u8]) -> Result<(BlockLayout, u32, Option<BlockHash>), WireError> {
    let head = prefix.get(..PREFIX_BYTES).ok_or(WireError::Truncated {
        need: PREFIX_BYTES,
        have: prefix.len(),
    })?;
    let (layout, n) = parse_prefix(head)?;
    let first = match n {
        0 => None,
        _ => Some(BlockHash::from_bytes(
            Reader(&prefix[PREFIX_BYTES..]).array()?,
        )),
    };
    Ok((layout, n, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> BlockLayout {
        BlockLayout {
            layers: 2,
            kv_heads: 1,
            head_dim: 2,
            block_tokens: 4,
            dtype: KvDtype::F32,
            arrangement: Arrangement::HeadMajor,
        }
    }

    fn hash(i: u8) -> BlockHash {
        BlockHash::from_bytes([i; 16])
    }

    #[test]
    fn blocks_round_trip_bit_exact() {
        let l = layout();
        let a: Vec<u8> = (0..l.payload_bytes() as usize).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..l.payload_bytes() as usize)
            .map(|i| (i * 7) as u8)
            .collect();
        let body = encode(&l, &[(hash(1), &a), (hash(2), &b)]).unwrap();
        assert_eq!(body.len() as u64, l.body_bytes(2));
        let d = decode(&body).unwrap();
        assert_eq!(d.layout, l);
        assert_eq!(d.blocks, vec![(hash(1), &a[..]), (hash(2), &b[..])]);
        assert!(d.damaged.is_empty());
        let (peeked, n, first) = peek(&body[..PREFIX_BYTES + 16]).unwrap();
        assert_eq!((peeked, n, first), (l, 2, Some(hash(1))));
        // The streaming pieces read the same body.
        assert_eq!(parse_prefix(&body[..PREFIX_BYTES]).unwrap(), (l, 2));
        let at = PREFIX_BYTES;
        assert_eq!(
            parse_block_prefix(&l, &body[at..at + 24]).unwrap(),
            (hash(1), l.payload_bytes())
        );
        let one = encode(&l, &[(hash(3), &b)]).unwrap();
        let (got, h, len) = block_head(&one[..BLOCK_HEAD_BYTES]).unwrap();
        assert_eq!((got, h, len), (l, hash(3), l.payload_bytes()));
        let sum = &one[BLOCK_HEAD_BYTES + len as usize..];
        assert_eq!(sum, checksum(&l, &hash(3), &b));
        assert!(block_head(&body[..BLOCK_HEAD_BYTES]).is_err(), "two blocks");
    }

    #[test]
    fn a_flipped_bit_or_a_wrong_hash_is_damaged_not_served() {
        let l = layout();
        let a = vec![3u8; l.payload_bytes() as usize];
        let body = encode(&l, &[(hash(1), &a), (hash(2), &a)]).unwrap();
        // A bit in the first payload.
        let mut flipped = body.clone();
        flipped[PREFIX_BYTES + 16 + 8 + 5] ^= 1;
        let d = decode(&flipped).unwrap();
        assert_eq!(d.damaged, vec![hash(1)]);
        assert_eq!(d.blocks.len(), 1);
        assert_eq!(d.blocks[0].0, hash(2));
        // The same bytes filed under another hash.
        let mut renamed = body.clone();
        renamed[PREFIX_BYTES] = 9;
        assert_eq!(decode(&renamed).unwrap().damaged.len(), 1);
    }

    #[test]
    fn structural_faults_are_errors() {
        let l = layout();
        let a = vec![0u8; l.payload_bytes() as usize];
        assert!(encode(&l, &[(hash(1), &a[1..])]).is_err());
        let body = encode(&l, &[(hash(1), &a)]).unwrap();
        assert!(matches!(
            decode(&body[..body.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut count = body.clone();
        count[PREFIX_BYTES - 4..PREFIX_BYTES].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&count), Err(WireError::Truncated { .. })));
        let mut other = body.clone();
        other[0] = b'X';
        assert_eq!(decode(&other), Err(WireError::Magic("KV block")));
        let mut dtype = body;
        dtype[8 + 16] = 7;
        assert!(decode(&dtype).unwrap_err().to_string().contains("dtype"));
    }
}
