//! Shard attention requests in the default model's geometry (SmolLM2-135M: 9 attention heads
//! over 3 KV heads of 64), for tests that talk to a shard directly.

use tidelock_protocol::shard::{Append, AttendRequest, AttendSeq};

/// Attention heads.
pub const HEADS: usize = 9;
/// KV heads.
pub const KV_HEADS: usize = 3;
/// Dimension of one head.
pub const DIM: usize = 64;

/// One token at `position` with key `k`, value `v` and query `q`; its block (index
/// `position / 16` of the sequence, 16-token blocks) at place `local` of the shard's store.
pub fn request(position: u64, local: u32, k: &[f32], v: &[f32], q: &[f32]) -> AttendRequest {
    AttendRequest {
        layer: 0,
        heads: HEADS as u32,
        kv_heads: KV_HEADS as u32,
        head_dim: DIM as u32,
        scale: 0.125,
        seqs: vec![AttendSeq {
            start: position,
            rows: 1,
            blocks: vec![((position / 16) as u32, local)],
        }],
        appends: vec![Append {
            local,
            slot: (position % 16) as u32,
            key: k.to_vec(),
            value: v.to_vec(),
        }],
        queries: q.to_vec(),
    }
}
