//! KV events: how a worker tells routers which blocks it holds, and where.
//!
//! A worker numbers its event batches per epoch: the first batch of an epoch has sequence 1 and
//! each later batch exactly one more. A router applies batches strictly in order; on a gap, a new
//! epoch, or an event it does not understand, it reloads a [`KvSnapshot`] and continues after the
//! snapshot's sequence. [`classify`] is the single home of that continuity rule. All types are JSON,
//! internally tagged by `type`, and ignore unknown fields so workers and routers can be upgraded
//! independently.

use serde::{Deserialize, Serialize};

use crate::hash::{BlockHash, BlockTokens};
use crate::ids::Epoch;

/// Where a block lives on its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The accelerator's memory or, on a CPU worker, the main KV pool: usable without a copy.
    Device,
    /// Host memory, a copy away from use.
    Host,
    /// Local disk, the slowest tier.
    Disk,
}

/// One change to a worker's set of cached blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEvent {
    /// `blocks` (a chain, in order) are now held on `tier`; the first block's parent is `parent`,
    /// or the root when `None`.
    Stored {
        /// Parent of `blocks[0]`; `None` when `blocks[0]` is the first block of a prompt.
        #[serde(default)]
        parent: Option<BlockHash>,
        /// The stored blocks, each the parent of the next.
        blocks: Vec<BlockHash>,
        /// The tier they were stored on.
        tier: Tier,
    },
    /// `blocks` are no longer held on `tier`.
    Removed {
        /// The removed blocks, in no particular order.
        blocks: Vec<BlockHash>,
        /// The tier they were removed from.
        tier: Tier,
    },
    /// Every block on every tier is gone.
    Cleared,
    /// An event type this build does not know. A consumer seeing it must resync from a snapshot,
    /// not skip it: the event changed the worker's block set in a way the consumer cannot apply.
    #[serde(other)]
    Unknown,
}

/// A batch of events, the unit of sequencing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventBatch {
    /// The run of the worker that produced the batch.
    pub epoch: Epoch,
    /// 1 for the first batch of an epoch, then exactly one more per batch.
    pub sequence: u64,
    /// The events, applied in order.
    #[serde(default)]
    pub events: Vec<KvEvent>,
}

/// One block in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBlock {
    /// The block.
    pub hash: BlockHash,
    /// Where it lives.
    pub tier: Tier,
}

/// A worker's whole block set at one point of its event sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshot {
    /// The run of the worker.
    pub epoch: Epoch,
    /// The last batch whose events the snapshot includes (0 if none); continue with the batch
    /// after it.
    pub sequence: u64,
    /// The worker's block size, so a router can check it hashes prompts the same way.
    pub block_tokens: BlockTokens,
    /// Every block the worker holds, with its tier.
    #[serde(default)]
    pub blocks: Vec<SnapshotBlock>,
}

/// How a batch relates to what a consumer has applied so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The next batch: apply it.
    InOrder,
    /// Already applied (a redelivery): skip it.
    Duplicate,
    /// Batches were lost: resync from a snapshot.
    Gap {
        /// The sequence that should have come next.
        expected: u64,
        /// The sequence that came.
        got: u64,
    },
    /// The worker restarted, or the consumer has no state for it yet: resync from a snapshot.
    NewEpoch,
}

impl Continuity {
    /// Whether the consumer must reload a snapshot before applying anything more.
    pub fn needs_resync(self) -> bool {
        matches!(self, Self::Gap { .. } | Self::NewEpoch)
    }
}

/// Classifies `batch` given the `(epoch, sequence)` of the last batch (or snapshot) applied.
///
/// `last` is `None` when the consumer holds nothing for this worker; that is treated like a new
/// epoch, because even a first batch cannot prove the worker started empty.
pub fn classify(last: Option<(Epoch, u64)>, batch: &KvEventBatch) -> Continuity {
    let Some((epoch, sequence)) = last else {
        return Continuity::NewEpoch;
    };
    if batch.epoch != epoch {
        return Continuity::NewEpoch;
    }
    match sequence.checked_add(1) {
        Some(expected) if batch.sequence == expected => Continuity::InOrder,
        Some(expected) if batch.sequence > expected => Continuity::Gap {
            expected,
            got: batch.sequence,
        },
        _ => Continuity::Duplicate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(byte: u8) -> BlockHash {
        BlockHash::from_bytes([byte; 16])
    }

    fn batch(epoch: u64, sequence: u64) -> KvEventBatch {
        KvEventBatch {
            epoch: Epoch::new(epoch),
            sequence,
            events: vec![],
        }
    }

    #[test]
    fn classify_table() {
        let e = |n| Epoch::new(n);
        let cases = [
            (None, batch(7, 1), Continuity::NewEpoch),
            (None, batch(7, 5), Continuity::NewEpoch),
            (Some((e(7), 0)), batch(7, 1), Continuity::InOrder),
            (Some((e(7), 4)), batch(7, 5), Continuity::InOrder),
            (Some((e(7), 4)), batch(7, 4), Continuity::Duplicate),
            (Some((e(7), 4)), batch(7, 2), Continuity::Duplicate),
            (Some((e(7), 4)), batch(7, 0), Continuity::Duplicate),
            (
                Some((e(7), 4)),
                batch(7, 6),
                Continuity::Gap {
                    expected: 5,
                    got: 6,
                },
            ),
            (
                Some((e(7), 0)),
                batch(7, 9),
                Continuity::Gap {
                    expected: 1,
                    got: 9,
                },
            ),
            (Some((e(7), 4)), batch(8, 1), Continuity::NewEpoch),
            (Some((e(7), 4)), batch(8, 5), Continuity::NewEpoch),
            (
                Some((e(7), u64::MAX)),
                batch(7, u64::MAX),
                Continuity::Duplicate,
            ),
        ];
        for (last, batch, expected) in cases {
            assert_eq!(
                classify(last, &batch),
                expected,
                "last {last:?}, batch {batch:?}"
            );
        }
        assert!(Continuity::NewEpoch.needs_resync());
        assert!(
            Continuity::Gap {
                expected: 1,
                got: 2
            }
            .needs_resync()
        );
        assert!(!Continuity::InOrder.needs_resync());
        assert!(!Continuity::Duplicate.needs_resync());
    }

    #[test]
    fn event_json_shape() {
        let stored = KvEvent::Stored {
            parent: Some(h(1)),
            blocks: vec![h(2)],
            tier: Tier::Device,
        };
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "stored",
                "parent": "01010101010101010101010101010101",
                "blocks": ["02020202020202020202020202020202"],
                "tier": "device",
            })
        );
        assert_eq!(
            serde_json::to_value(KvEvent::Cleared).unwrap(),
            serde_json::json!({"type": "cleared"})
        );
        assert_eq!(serde_json::to_value(Tier::Disk).unwrap(), "disk");
    }

    #[test]
    fn events_round_trip_and_tolerate_unknowns() {
        let events = [
            KvEvent::Stored {
                parent: None,
                blocks: vec![h(1), h(2)],
                tier: Tier::Host,
            },
            KvEvent::Removed {
                blocks: vec![h(3)],
                tier: Tier::Disk,
            },
            KvEvent::Cleared,
        ];
        for event in events {
            let json = serde_json::to_string(&event).unwrap();
            assert_eq!(serde_json::from_str::<KvEvent>(&json).unwrap(), event);
        }

        let stored: KvEvent = serde_json::from_str(
            r#"{"type":"stored","blocks":[],"tier":"device","future_field":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(
            stored,
            KvEvent::Stored {
                parent: None,
                blocks: vec![],
                tier: Tier::Device
            }
        );
        let unknown: KvEvent =
            serde_json::from_str(r#"{"type":"moved","blocks":[],"from":"host"}"#).unwrap();
        assert_eq!(unknown, KvEvent::Unknown);
    }

    #[test]
    fn batch_and_snapshot_round_trip_and_tolerate_unknowns() {
        let batch = KvEventBatch {
            epoch: Epoch::new(u64::MAX - 1),
            sequence: 3,
            events: vec![KvEvent::Cleared, KvEvent::Unknown],
        };
        let json = serde_json::to_string(&batch).unwrap();
        assert_eq!(serde_json::from_str::<KvEventBatch>(&json).unwrap(), batch);
        let extra: KvEventBatch =
            serde_json::from_str(r#"{"epoch":1,"sequence":2,"events":[],"worker":"w"}"#).unwrap();
        assert_eq!(extra.sequence, 2);

        let snapshot = KvSnapshot {
            epoch: Epoch::new(9),
            sequence: 0,
            block_tokens: BlockTokens::DEFAULT,
            blocks: vec![SnapshotBlock {
                hash: h(4),
                tier: Tier::Device,
            }],
        };
        let json = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(serde_json::from_str::<KvSnapshot>(&json).unwrap(), snapshot);
        let extra: KvSnapshot = serde_json::from_str(
            r#"{"epoch":9,"sequence":0,"block_tokens":64,"blocks":[],"taken_at":"now"}"#,
        )
        .unwrap();
        assert_eq!(extra.block_tokens, BlockTokens::DEFAULT);
        assert!(
            serde_json::from_str::<KvSnapshot>(r#"{"epoch":9,"sequence":0,"block_tokens":63}"#)
                .is_err()
        );
    }
}
