//! The shard attention RPC of a shard group (issue #7): the coordinator (the worker the router
//! pinned) sends each shard, per layer, the new keys and values whose blocks live there and the
//! batch's queries; the shard appends, computes attention over the blocks it holds and replies
//! with outputs normalised over them and their log-sum-exp, which the coordinator merges exactly.
//!
//! Binary bodies, all little-endian, no padding (JSON would triple the bytes and cost more CPU
//! than the attention of a decode step):
//!
//! ```text
//! request  "TLSA" u16 version=2 u16 kind=1
//!          u32 layer  u32 heads  u32 kv_heads  u32 head_dim  f32 scale  u32 n_seqs  u32 n_appends
//!          n_seqs    x { u64 start  u32 rows  u32 n_blocks  n_blocks x { u32 logical  u32 local } }
//!          n_appends x { u32 local  u32 slot  f32[kv_heads*head_dim] key  f32[kv_heads*head_dim] value }
//!          f32[sum(rows) * heads * head_dim] queries
//! reply    "TLSA" u16 version=2 u16 kind=2
//!          u64 incarnation  u32 rows  u32 heads  u32 head_dim
//!          f32[rows * heads * head_dim] outputs   f32[rows * heads] log-sum-exp (-inf: nothing seen)
//! ```
//!
//! Shards are stateless: the coordinator's block pool owns every block of the group, and a
//! request names blocks by their place in the shard's store (`local`). Per sequence: `start`, the
//! position of its first row, and the blocks of its context this shard holds, as pairs of the
//! block's index in the sequence (`logical`, ascending; it covers positions
//! `logical * block_tokens ..`) and its place. An append writes one token's key and value at
//! `slot` of block `local`. The reply's `incarnation` is drawn when the shard starts: a
//! coordinator that sees it change knows the shard restarted and lost what it held.
//!
//! Version 1 kept per-session tables on the shard; version 2 moved all bookkeeping to the
//! coordinator, so prefix caching and KV events are the coordinator pool's, one place for the
//! whole group, and a shard holds no state to reconcile after a restart.
//!
//! Decoding checks every count against the bytes present before allocating, so a corrupt or
//! hostile body is an error, never a huge allocation.

/// First bytes of every body.
pub const MAGIC: [u8; 4] = *b"TLSA";
/// The format's version; a body of another version is refused.
pub const VERSION: u16 = 2;
const KIND_REQUEST: u16 = 1;
const KIND_REPLY: u16 = 2;

use crate::binary::{Format, Reader, WireError, Writer, product};

/// One sequence of the batch, as the shard sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttendSeq {
    /// Position of the sequence's first row.
    pub start: u64,
    pub rows: u32,
    /// The sequence's blocks this shard holds, ascending: (index in the sequence, place in the
    /// shard's store).
    pub blocks: Vec<(u32, u32)>,
}

/// A new token's key and value, for the shard holding its block.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    /// The block's place in the shard's store.
    pub local: u32,
    /// The token's slot in the block.
    pub slot: u32,
    pub key: Vec<f32>,
    pub value: Vec<f32>,
}

/// One layer's work for one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct AttendRequest {
    pub layer: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub scale: f32,
    pub seqs: Vec<AttendSeq>,
    pub appends: Vec<Append>,
    /// `[rows, heads * head_dim]`, rows in sequence order.
    pub queries: Vec<f32>,
}

/// A shard's answer: per (row, head) the output over its blocks and the log-sum-exp.
#[derive(Debug, Clone, PartialEq)]
pub struct AttendReply {
    /// Drawn when the shard started; a change means it restarted and lost its blocks.
    pub incarnation: u64,
    pub rows: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub outputs: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Why a shard RPC body cannot be decoded (or a value cannot be encoded).
pub type ShardWireError = WireError;

/// The shard RPC's framing.
const FORMAT: Format = Format {
    magic: MAGIC,
    version: VERSION,
    name: "shard RPC",
};

impl AttendRequest {
    /// Rows of the batch (the sum of the sequences' rows).
    pub fn rows(&self) -> u64 {
        self.seqs.iter().map(|s| u64::from(s.rows)).sum()
    }

    pub fn encode(&self) -> Result<Vec<u8>, ShardWireError> {
        self.check()?;
        let kv_width = (self.kv_heads * self.head_dim) as usize;
        let size = 36
            + self
                .seqs
                .iter()
                .map(|s| 16 + 8 * s.blocks.len())
                .sum::<usize>()
            + self.appends.len() * (8 + 8 * kv_width)
            + self.queries.len() * 4;
        let mut w = Writer::header(&FORMAT, KIND_REQUEST, size);
        for v in [self.layer, self.heads, self.kv_heads, self.head_dim] {
            w.u32(v);
        }
        w.f32s(&[self.scale]);
        w.u32(
            u32::try_from(self.seqs.len())
                .map_err(|_| ShardWireError::Invalid("too many sequences".into()))?,
        );
        w.u32(
            u32::try_from(self.appends.len())
                .map_err(|_| ShardWireError::Invalid("too many appends".into()))?,
        );
        for s in &self.seqs {
            w.u64(s.start);
            w.u32(s.rows);
            w.u32(
                u32::try_from(s.blocks.len())
                    .map_err(|_| ShardWireError::Invalid("too many blocks in a sequence".into()))?,
            );
            for &(logical, local) in &s.blocks {
                w.u32(logical);
                w.u32(local);
            }
        }
        for a in &self.appends {
            w.u32(a.local);
            w.u32(a.slot);
            w.f32s(&a.key);
            w.f32s(&a.value);
        }
        w.f32s(&self.queries);
        Ok(w.0)
    }

    pub fn decode(body: &[u8]) -> Result<AttendRequest, ShardWireError> {
        let mut r = Reader(body);
        r.header(&FORMAT, KIND_REQUEST, "request")?;
        let (layer, heads, kv_heads, head_dim) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let scale = r.f32()?;
        let (n_seqs, n_appends) = (r.u32()?, r.u32()?);
        // Each sequence takes at least 16 bytes and each block 8: a count beyond the body is
        // refused before allocating.
        r.fits(n_seqs, 16)?;
        let seqs = (0..n_seqs)
            .map(|_| {
                let (start, rows, n) = (r.u64()?, r.u32()?, r.u32()?);
                r.fits(n, 8)?;
                let blocks = (0..n)
                    .map(|_| Ok((r.u32()?, r.u32()?)))
                    .collect::<Result<Vec<_>, ShardWireError>>()?;
                Ok(AttendSeq {
                    start,
                    rows,
                    blocks,
                })
            })
            .collect::<Result<Vec<_>, ShardWireError>>()?;
        let kv_width = product(&[u64::from(kv_heads), u64::from(head_dim)], "kv width")?;
        if kv_width == 0 {
            return Err(ShardWireError::Invalid(format!(
                "{kv_heads} kv heads of {head_dim}"
            )));
        }
        // Each append is 8 bytes and two vectors of kv_width floats (a width so large that this
        // overflows is refused, not wrapped: found by tests/fuzz.rs).
        let append_bytes = kv_width
            .checked_mul(8)
            .and_then(|b| b.checked_add(8))
            .ok_or_else(|| {
                ShardWireError::Invalid(format!("{kv_heads} kv heads of {head_dim}: too wide"))
            })?;
        r.fits(n_appends, append_bytes)?;
        let mut appends = Vec::with_capacity(n_appends as usize);
        for _ in 0..n_appends {
            let (local, slot) = (r.u32()?, r.u32()?);
            appends.push(Append {
                local,
                slot,
                key: r.f32s(kv_width)?,
                value: r.f32s(kv_width)?,
            });
        }
        let rows: u64 = seqs.iter().map(|s| u64::from(s.rows)).sum();
        let queries = r.f32s(product(
            &[rows, u64::from(heads), u64::from(head_dim)],
            "queries",
        )?)?;
        r.end()?;
        let request = AttendRequest {
            layer,
            heads,
            kv_heads,
            head_dim,
            scale,
            seqs,
            appends,
            queries,
        };
        request.check()?;
        Ok(request)
    }

    /// The invariants both sides rely on.
    fn check(&self) -> Result<(), ShardWireError> {
        let invalid = |m: String| Err(ShardWireError::Invalid(m));
        if self.kv_heads == 0 || self.head_dim == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return invalid(format!(
                "{} heads over {} kv heads of {}",
                self.heads, self.kv_heads, self.head_dim
            ));
        }
        let width = (self.kv_heads as usize) * (self.head_dim as usize);
        for (i, s) in self.seqs.iter().enumerate() {
            if s.blocks.windows(2).any(|w| w[0].0 >= w[1].0) {
                return invalid(format!("sequence {i}: block indices are not ascending"));
            }
        }
        for a in &self.appends {
            if a.key.len() != width || a.value.len() != width {
                return invalid(format!(
                    "an append of {}/{} floats, not {width}",
                    a.key.len(),
                    a.value.len()
                ));
            }
        }
        let want = self.rows() * u64::from(self.heads) * u64::from(self.head_dim);
        if self.queries.len() as u64 != want {
            return invalid(format!("{} query floats for {want}", self.queries.len()));
        }
        Ok(())
    }
}

impl AttendReply {
    pub fn encode(&self) -> Result<Vec<u8>, ShardWireError> {
        let heads = u64::from(self.rows) * u64::from(self.heads);
        if self.lse.len() as u64 != heads
            || self.outputs.len() as u64 != heads * u64::from(self.head_dim)
        {
            return Err(ShardWireError::Invalid(format!(
                "{} outputs and {} lse for {} rows of {} heads of {}",
                self.outputs.len(),
                self.lse.len(),
                self.rows,
                self.heads,
                self.head_dim
            )));
        }
        let mut w = Writer::header(
            &FORMAT,
            KIND_REPLY,
            28 + (self.outputs.len() + self.lse.len()) * 4,
        );
        w.u64(self.incarnation);
        for v in [self.rows, self.heads, self.head_dim] {
            w.u32(v);
        }
        w.f32s(&self.outputs);
        w.f32s(&self.lse);
        Ok(w.0)
    }

    pub fn decode(body: &[u8]) -> Result<AttendReply, ShardWireError> {
        let mut r = Reader(body);
        r.header(&FORMAT, KIND_REPLY, "reply")?;
        let incarnation = r.u64()?;
        let (rows, heads, head_dim) = (r.u32()?, r.u32()?, r.u32()?);
        let pairs = product(&[u64::from(rows), u64::from(heads)], "reply")?;
        let outputs = r.f32s(product(&[pairs, u64::from(head_dim)], "reply")?)?;
        let lse = r.f32s(pairs)?;
        r.end()?;
        Ok(AttendReply {
            incarnation,
            rows,
            heads,
            head_dim,
            outputs,
            lse,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> AttendRequest {
        AttendRequest {
            layer: 1,
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
            scale: 0.5,
            seqs: vec![
                AttendSeq {
                    start: 130,
                    rows: 1,
                    blocks: vec![(0, 7), (2, 3)],
                },
                AttendSeq {
                    start: 0,
                    rows: 2,
                    blocks: vec![(0, 9)],
                },
            ],
            appends: vec![Append {
                local: 3,
                slot: 2,
                key: vec![1.0, -1.0],
                value: vec![0.25, 2.0],
            }],
            queries: (0..12).map(|i| i as f32 / 4.0).collect(),
        }
    }

    /// Found by `tests/fuzz.rs` (seed 5): kv heads times head dim near 2^64 overflowed the
    /// append size check (`8 + 8 * width`) and panicked in a debug build instead of refusing.
    #[test]
    fn an_overflowing_kv_width_is_refused() {
        let mut body = request().encode().unwrap();
        // Layer, heads, kv heads, head dim follow the 8-byte header.
        body[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        body[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = AttendRequest::decode(&body).unwrap_err();
        assert!(error.to_string().contains("too wide"), "{error}");
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let r = request();
        assert_eq!(AttendRequest::decode(&r.encode().unwrap()).unwrap(), r);
        let reply = AttendReply {
            incarnation: 0x0102_0304_0506_0708,
            rows: 3,
            heads: 2,
            head_dim: 2,
            outputs: (0..12).map(|i| i as f32).collect(),
            lse: vec![0.5, f32::NEG_INFINITY, 1.0, 2.0, 3.0, 4.0],
        };
        assert_eq!(
            AttendReply::decode(&reply.encode().unwrap()).unwrap(),
            reply
        );
    }

    /// The bytes are the contract between workers of different builds: any change here is a
    /// format change (bump VERSION).
    #[test]
    fn the_request_layout_is_fixed() {
        let bytes = request().encode().unwrap();
        assert_eq!(
            bytes.len(),
            36 + (16 + 2 * 8) + (16 + 8) + (8 + 2 * 2 * 4) + 12 * 4
        );
        let hex: String = bytes[..36].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "544c5341", "0200", "0100", // magic, version 2, request
                "01000000", "02000000", "01000000", "02000000", // layer, heads, kv heads, dim
                "0000003f", // scale 0.5
                "02000000", "01000000", // 2 sequences, 1 append
            )
        );
        // The first sequence: start 130, 1 row, 2 blocks: index 0 at 7, index 2 at 3.
        assert_eq!(
            &bytes[36..68],
            [
                130, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 2, 0, 0,
                0, 3, 0, 0, 0
            ]
        );
        // The append: block 3, slot 2.
        assert_eq!(&bytes[92..100], [3, 0, 0, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn damaged_bodies_are_errors() {
        let bytes = request().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(
                AttendRequest::decode(&bytes[..n]).is_err(),
                "a body cut at {n} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            AttendRequest::decode(&longer),
            Err(ShardWireError::Trailing(1))
        );
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(
            AttendRequest::decode(&bad),
            Err(ShardWireError::Magic("shard RPC"))
        );
        let mut version = bytes.clone();
        version[4] = 1;
        assert_eq!(
            AttendRequest::decode(&version),
            Err(ShardWireError::Version {
                what: "shard RPC",
                got: 1,
                speaks: 2
            })
        );
        let reply = AttendReply {
            incarnation: 1,
            rows: 0,
            heads: 1,
            head_dim: 1,
            outputs: vec![],
            lse: vec![],
        };
        assert!(matches!(
            AttendRequest::decode(&reply.encode().unwrap()),
            Err(ShardWireError::Kind { .. })
        ));
        // Huge counts with no bytes behind them: refused, nothing allocated.
        let mut huge = bytes[..36].to_vec();
        huge[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            AttendRequest::decode(&huge),
            Err(ShardWireError::Truncated { .. })
        ));
        let mut wide = bytes.clone();
        wide[12..16].copy_from_slice(&u32::MAX.to_le_bytes()); // heads
        assert!(AttendRequest::decode(&wide).is_err());
        // A block count with no bytes behind it.
        let mut many = bytes.clone();
        many[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            AttendRequest::decode(&many),
            Err(ShardWireError::Truncated { .. })
        ));
        // No kv heads: appends would cost nothing in the body; refused before any is read.
        let mut flat = bytes.clone();
        flat[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            AttendRequest::decode(&flat),
            Err(ShardWireError::Invalid("0 kv heads of 2".into()))
        );
        // More appends than the body holds.
        let mut appends = bytes.clone();
        appends[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            AttendRequest::decode(&appends),
            Err(ShardWireError::Truncated { .. })
        ));
        // Blocks out of order.
        let mut r = request();
        r.seqs[0].blocks.reverse();
        assert!(matches!(r.encode(), Err(ShardWireError::Invalid(_))));
    }
}
