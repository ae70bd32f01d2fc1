use std::time::Duration;

use tidelock_protocol::blocks::{Arrangement, KvDtype};

use super::*;
use crate::kv::{KvShape, KvStore};
use tidelock_protocol::BlockId;

fn shape() -> KvShape {
    KvShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 4,
        block_tokens: 4,
    }
}

fn layout() -> BlockLayout {
    shape().block_layout(KvDtype::F32, Arrangement::HeadMajor)
}

fn h(i: u8) -> BlockHash {
    BlockHash::from_bytes([i; 16])
}

/// A store whose every float is distinct (and some are odd bit patterns: -0.0, NaN payloads).
fn filled(blocks: usize) -> KvStore {
    let mut store = KvStore::new(shape(), blocks);
    let s = shape();
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    for layer in 0..s.layers {
        for p in 0..blocks * s.block_tokens {
            let k: Vec<f32> = (0..8)
                .map(|i| f32::from_bits(0x3f80_0000 + (layer * 1000 + p * 10 + i) as u32))
                .collect();
            let mut v = k.clone();
            v[0] = -0.0;
            v[1] = f32::from_bits(0x7fc0_1234);
            store.write(layer, &table, p, &k, &v);
        }
    }
    store
}

fn disk(dir: &std::path::Path, blocks: u64) -> Tiers {
    let config = TierConfig {
        host_bytes: 0,
        disk: Some((dir.to_owned(), blocks * layout().body_bytes(1))),
    };
    Tiers::open(&config, layout()).unwrap()
}

/// Polls until nothing is loading (at most 10 s).
fn settle(t: &mut Tiers) {
    for _ in 0..1000 {
        if !t.loading() {
            return;
        }
        t.poll(Some(Duration::from_millis(10)));
    }
    panic!("reads did not finish");
}

fn export(store: &KvStore, block: u32) -> Vec<u8> {
    let mut out = Vec::new();
    store.export_block(BlockId::new(block), &mut out).unwrap();
    out
}

#[test]
fn blocks_round_trip_bit_exact_through_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(3);
    let mut t = disk(dir.path(), 8);
    for b in 0..3u8 {
        t.demote(h(b), |out| {
            store.export_block(BlockId::new(u32::from(b)), out)
        });
    }
    assert_eq!(t.stats().stored_disk, 3);
    assert!(t.flush(Duration::from_secs(10)));
    assert_eq!(
        t.fetch(&[h(0), h(1), h(2), h(9)]),
        Fetch {
            ready: 0,
            pending: true
        }
    );
    settle(&mut t);
    assert_eq!(t.fetch(&[h(0), h(1), h(2)]).ready, 3);
    let mut other = KvStore::new(shape(), 3);
    for b in 0..3u8 {
        let (bytes, tier, _) = t.take_staged(&h(b)).unwrap();
        assert_eq!(tier, Source::Disk);
        // Into another place than it came from.
        other
            .import_block(BlockId::new(2 - u32::from(b)), &bytes)
            .unwrap();
        assert_eq!(
            export(&other, 2 - u32::from(b)),
            export(&store, u32::from(b))
        );
    }
    let events = t.take_events();
    assert_eq!(
        events,
        [KvEvent::Stored {
            parent: None,
            blocks: vec![h(0), h(1), h(2)],
            tier: Tier::Disk
        }]
    );
}

#[test]
fn a_damaged_file_is_a_counted_miss_and_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(2);
    let mut t = disk(dir.path(), 8);
    t.demote(h(1), |out| store.export_block(BlockId::new(0), out));
    t.demote(h(2), |out| store.export_block(BlockId::new(1), out));
    assert!(t.flush(Duration::from_secs(10)));
    t.take_events();
    let hex = h(1).to_string();
    let path = dir.path().join(&hex[..2]).join(format!("{hex}.kvb"));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    t.fetch(&[h(1), h(2)]);
    settle(&mut t);
    // The chain stops at the damaged block: nothing after it is usable as a prefix.
    assert_eq!(
        t.fetch(&[h(1), h(2)]),
        Fetch {
            ready: 0,
            pending: false
        }
    );
    assert_eq!(t.stats().damaged, 1);
    assert_eq!(t.tier_of(&h(1)), None);
    assert_eq!(t.tier_of(&h(2)), Some(Tier::Disk));
    assert!(t.flush(Duration::from_secs(10)));
    assert!(!path.exists(), "the damaged file is deleted");
    assert_eq!(
        t.take_events(),
        [KvEvent::Removed {
            blocks: vec![h(1)],
            tier: Tier::Disk
        }]
    );
}

#[test]
fn a_full_disk_tier_evicts_its_least_recently_used_block_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(1);
    let mut t = disk(dir.path(), 2);
    let put = |t: &mut Tiers, i: u8| t.demote(h(i), |out| store.export_block(BlockId::new(0), out));
    put(&mut t, 1);
    put(&mut t, 2);
    // Demoting a block the disk holds only marks it used: 1 is now newer than 2.
    put(&mut t, 1);
    assert_eq!(t.stats().stored_disk, 2);
    put(&mut t, 3);
    assert_eq!(t.tier_of(&h(2)), None);
    assert_eq!(t.tier_of(&h(1)), Some(Tier::Disk));
    assert_eq!(t.stats().evicted_disk, 1);
    assert_eq!(t.stats().disk_blocks, 2);
    assert!(t.flush(Duration::from_secs(10)));
    let files = walk(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let events = t.take_events();
    assert!(events.contains(&KvEvent::Removed {
        blocks: vec![h(2)],
        tier: Tier::Disk
    }));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(dir).unwrap() {
        let fan = fan.unwrap().path();
        if fan.is_dir() {
            out.extend(std::fs::read_dir(fan).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn a_reopened_folder_finds_its_blocks_and_drops_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(2);
    {
        let mut t = disk(dir.path(), 8);
        t.demote(h(1), |out| store.export_block(BlockId::new(0), out));
        t.demote(h(2), |out| store.export_block(BlockId::new(1), out));
        // A second worker on the same folder is refused while the first holds it.
        let again = Tiers::open(
            &TierConfig {
                host_bytes: 0,
                disk: Some((dir.path().to_owned(), 1 << 20)),
            },
            layout(),
        );
        assert!(matches!(again, Err(DiskError::Locked { .. })), "{again:?}");
    }
    // Strangers: another layout's block, a leftover temporary file, a file under a wrong name.
    let other = BlockLayout {
        head_dim: 8,
        ..layout()
    };
    let payload = vec![0u8; other.payload_bytes() as usize];
    let fan = dir.path().join("07");
    std::fs::create_dir_all(&fan).unwrap();
    let body = tidelock_protocol::blocks::encode(&other, &[(h(7), &payload)]).unwrap();
    std::fs::write(fan.join(format!("{}.kvb", h(7))), body).unwrap();
    std::fs::write(fan.join(format!("{}.tmp", h(7))), b"torn").unwrap();
    let first = std::fs::read(
        walk(dir.path())
            .into_iter()
            .find(|p| p.to_string_lossy().contains(&h(1).to_string()))
            .unwrap(),
    )
    .unwrap();
    std::fs::write(fan.join(format!("{}.kvb", h(8))), first).unwrap();

    let mut t = disk(dir.path(), 8);
    let mut found = t.blocks();
    found.sort_by_key(|(h, _)| *h);
    assert_eq!(found, [(h(1), Tier::Disk), (h(2), Tier::Disk)]);
    assert_eq!(walk(dir.path()).len(), 2);
    t.fetch(&[h(1), h(2)]);
    settle(&mut t);
    let (bytes, _, _) = t.take_staged(&h(2)).unwrap();
    assert_eq!(&bytes[..], &export(&store, 1)[..]);
}

#[test]
fn the_host_tier_passes_its_oldest_blocks_down_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(1);
    let block = layout().payload_bytes();
    let mut t = Tiers::open(
        &TierConfig {
            host_bytes: 2 * block,
            disk: Some((dir.path().to_owned(), 8 * layout().body_bytes(1))),
        },
        layout(),
    )
    .unwrap();
    for i in 1..=3 {
        t.demote(h(i), |out| store.export_block(BlockId::new(0), out));
    }
    assert_eq!(t.tier_of(&h(1)), Some(Tier::Disk));
    assert_eq!(t.tier_of(&h(3)), Some(Tier::Host));
    assert_eq!((t.stats().stored_host, t.stats().stored_disk), (3, 1));
    // Host blocks are staged at once; the disk one after a read.
    assert_eq!(
        t.fetch(&[h(3), h(2), h(1)]),
        Fetch {
            ready: 2,
            pending: true
        }
    );
    settle(&mut t);
    assert_eq!(t.fetch(&[h(3), h(2), h(1)]).ready, 3);
    let events = t.take_events();
    assert_eq!(
        events,
        [
            KvEvent::Stored {
                parent: None,
                blocks: vec![h(1), h(2)],
                tier: Tier::Host
            },
            KvEvent::Removed {
                blocks: vec![h(1)],
                tier: Tier::Host
            },
            KvEvent::Stored {
                parent: None,
                blocks: vec![h(1)],
                tier: Tier::Disk
            },
            KvEvent::Stored {
                parent: None,
                blocks: vec![h(3)],
                tier: Tier::Host
            },
        ]
    );
}
