//! A worker started as shard 1 of a group of 2 (as the operator starts one: `--shards`,
//! `--shard`) says so in `/v1/info` and serves the shard attention RPC over HTTP: a new token
//! appended to its block comes back as the attention output over that one position (its value,
//! softmax weight 1) with log-sum-exp `q.k * scale`; a position of the other shard's block is
//! refused with a 400 naming the owner; and an impossible shard index stops the worker at start.

use std::process::Command;
use std::time::Duration;

use tidelock_e2e::{Proc, binary, free_port, http_get, model_path};
use tidelock_protocol::shard::{Append, AttendReply, AttendRequest, AttendSeq};
use tidelock_worker::kv::shard::ShardLink;
use tidelock_worker::shard_rpc::HttpLink;

// The default model's attention geometry (SmolLM2-135M): 9 heads over 3 KV heads of 64.
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const DIM: usize = 64;

fn request(position: u64, blocks: u32, k: &[f32], v: &[f32], q: &[f32]) -> AttendRequest {
    AttendRequest {
        layer: 0,
        heads: HEADS as u32,
        kv_heads: KV_HEADS as u32,
        head_dim: DIM as u32,
        scale: 0.125,
        seqs: vec![AttendSeq {
            session: 7,
            start: position,
            rows: 1,
            blocks,
        }],
        appends: vec![Append {
            seq: 0,
            position,
            key: k.to_vec(),
            value: v.to_vec(),
        }],
        queries: q.to_vec(),
    }
}

#[test]
fn a_worker_serves_its_shard_of_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args: Vec<String> = [
        "--model",
        &model_path().to_string_lossy(),
        "--engine",
        "sim",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--kv-cache",
        "64MiB",
        "--shards",
        "2",
        "--shard",
        "1",
        "--block-tokens",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut worker = Proc::spawn("shard-1", &binary("tidelock-worker"), &args, dir.path());
    worker.wait_ready(port, "/readyz", Duration::from_secs(60));
    let (_, info) = http_get(port, "/v1/info").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (info["shard"].as_u64(), info["shard_count"].as_u64()),
        (Some(1), Some(2)),
        "{info}"
    );

    let k: Vec<f32> = (0..KV_HEADS * DIM)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
        .collect();
    let v: Vec<f32> = (0..KV_HEADS * DIM)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let q: Vec<f32> = (0..HEADS * DIM).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut link =
        HttpLink::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5)).unwrap();
    // Position 16 is block 1: shard 1 of 2 holds it, and it is the only position there.
    let reply = link
        .call(request(16, 2, &k, &v, &q).encode().unwrap())
        .unwrap();
    let reply = AttendReply::decode(&reply).unwrap();
    assert_eq!((reply.rows, reply.heads), (1, HEADS as u32));
    for h in 0..HEADS {
        let kv = h / (HEADS / KV_HEADS);
        let (kh, vh) = (&k[kv * DIM..][..DIM], &v[kv * DIM..][..DIM]);
        let qh = &q[h * DIM..][..DIM];
        let out = &reply.outputs[h * DIM..][..DIM];
        for (o, want) in out.iter().zip(vh) {
            assert!((o - want).abs() < 1e-6, "head {h}: {o} vs {want}");
        }
        let lse: f32 = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * 0.125;
        assert!(
            (reply.lse[h] - lse).abs() < 1e-5,
            "head {h}: lse {} vs {lse}",
            reply.lse[h]
        );
    }
    // Position 0 is block 0, shard 0's.
    let e = link
        .call(request(0, 2, &k, &v, &q).encode().unwrap())
        .unwrap_err();
    assert!(e.contains("400") && e.contains("belongs to shard 0"), "{e}");
    worker.stop(Duration::from_secs(10));

    // Shard 2 of 2 does not exist: the worker refuses to start, saying why.
    let out = Command::new(binary("tidelock-worker"))
        .args([
            "--model",
            &model_path().to_string_lossy(),
            "--engine",
            "sim",
        ])
        .args(["--shards", "2", "--shard", "2", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--shard 2 of --shards 2"), "{stderr}");
}
