//! A worker started as shard 1 of a group of 2 (as the operator starts one: `--shards`,
//! `--shard`) says so in `/v1/info` and serves the shard attention RPC over HTTP: a new token
//! appended to a block comes back as the attention output over that one position (its value,
//! softmax weight 1) with log-sum-exp `q.k * scale`, under the same incarnation call after call;
//! a block outside its store is refused with a 400 saying so; its metrics count both; and an impossible shard index, or
//! a coordinator without its peers, stops the worker at start.

use std::process::Command;
use std::time::Duration;

use tidelock_e2e::{Proc, binary, free_port, http_get, model_path};
use tidelock_protocol::shard::{Append, AttendRequest, AttendSeq};
use tidelock_worker::kv::shard::ShardLink;
use tidelock_worker::shard_rpc::HttpLink;

// The default model's attention geometry (SmolLM2-135M): 9 heads over 3 KV heads of 64.
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const DIM: usize = 64;

/// One token at `position`, its block (index `position / 16` of the sequence) at `local`.
fn request(position: u64, local: u32, k: &[f32], v: &[f32], q: &[f32]) -> AttendRequest {
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
    // Position 16 starts block 1 of the sequence, kept at place 5: the only position there.
    let reply = link.call(&request(16, 5, &k, &v, &q)).unwrap();
    let again = link.call(&request(17, 6, &k, &v, &q)).unwrap();
    assert_eq!(
        again.incarnation, reply.incarnation,
        "one process, one incarnation"
    );
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
    // 64 MiB holds 91 blocks of this model.
    let e = link.call(&request(0, 91, &k, &v, &q)).unwrap_err();
    assert!(
        e.contains("400") && e.contains("block place 91 is outside this shard's 91"),
        "{e}"
    );
    // Its metrics count what it served.
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    for line in [
        "tidelock_shard_requests_total{outcome=\"ok\"} 2",
        "tidelock_shard_requests_total{outcome=\"error\"} 1",
        "tidelock_shard_kv_blocks_capacity 91",
        "tidelock_shard_request_seconds_count 3",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
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

    // A coordinator must know every shard of its group.
    let out = Command::new(binary("tidelock-worker"))
        .args(["--model", &model_path().to_string_lossy()])
        .args(["--shards", "2", "--shard-peers", "http://127.0.0.1:1"])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--shard-peers names 1 workers; shard 0 of a group of 2 needs all 2"),
        "{stderr}"
    );
}
