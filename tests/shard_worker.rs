//! A worker started as shard 1 of a group of 2 (as the operator starts one: `--shards`,
//! `--shard`) says so in `/v1/info` and serves the shard attention RPC over HTTP: a new token
//! appended to a block comes back as the attention output over that one position (its value,
//! softmax weight 1) with log-sum-exp `q.k * scale`, under the same incarnation call after call;
//! a block outside its store is refused with a 400 saying so; every route but the probes needs
//! the cluster credential (a shard write without it, or with another token, is a 401); its
//! metrics count all of it, on the main port with the credential and on its metrics-only port
//! without; and a worker without a credential, an impossible shard index, or a coordinator
//! without its peers, stops at start.

use std::process::Command;
use std::time::Duration;

use tidelock_e2e::shard::{DIM, HEADS, KV_HEADS, request};
use tidelock_e2e::{Proc, binary, free_port, http_get, http_get_with, model_path};
use tidelock_protocol::ClusterToken;
use tidelock_worker::kv::shard::{ShardFault, ShardLink};
use tidelock_worker::shard_rpc::HttpLink;

#[test]
fn a_worker_serves_its_shard_of_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let token = ClusterToken::generate();
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, token.expose()).unwrap();
    let args: Vec<String> = [
        "--cluster-token-file",
        &token_file.to_string_lossy(),
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
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
    // Every route but the probes needs the cluster credential.
    for path in ["/v1/info", "/metrics", "/v1/shard/attend"] {
        let (status, body) = http_get(port, path).unwrap();
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("invalid_cluster_credential"), "{body}");
    }
    let (_, info) = http_get_with(port, "/v1/info", Some(token.expose())).unwrap();
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
    let url = format!("http://127.0.0.1:{port}");
    // A shard write without the credential (or with another group's) is refused, not stored.
    for wrong in [None, Some(ClusterToken::generate())] {
        let mut link = HttpLink::new(&url, Duration::from_secs(5), wrong).unwrap();
        let e = link.call(&request(
            16,
            5,
            &[9.0; KV_HEADS * DIM],
            &[9.0; KV_HEADS * DIM],
            &[0.0; HEADS * DIM],
        ));
        let e = e.unwrap_err();
        assert!(
            matches!(&e, ShardFault::Status { status: 401, message } if message.contains("invalid_cluster_credential")),
            "{e}"
        );
    }
    let mut link = HttpLink::new(&url, Duration::from_secs(5), Some(token.clone())).unwrap();
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
        matches!(&e, ShardFault::Status { status: 400, message } if message.contains("block place 91 is outside this shard's 91")),
        "{e}"
    );
    // Its metrics count what it served and what it refused, on the main port with the
    // credential and on the metrics port, which serves nothing else, without it.
    let (_, metrics) = http_get_with(port, "/metrics", Some(token.expose())).unwrap();
    let (status, open_metrics) = http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for metrics in [&metrics, &open_metrics] {
        for line in [
            "tidelock_shard_requests_total{outcome=\"ok\"} 2",
            "tidelock_shard_requests_total{outcome=\"error\"} 1",
            "tidelock_shard_kv_blocks_capacity 91",
            "tidelock_shard_request_seconds_count 3",
            "tidelock_internal_unauthorized_requests_total{reason=\"missing\"} 4",
            "tidelock_internal_unauthorized_requests_total{reason=\"invalid\"} 1",
        ] {
            assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
        }
    }
    for path in ["/v1/info", "/v1/shard/attend"] {
        assert_eq!(http_get(metrics_port, path).unwrap().0, 404, "{path}");
    }
    worker.stop(Duration::from_secs(10));

    // Without a credential (and without --no-cluster-auth) a worker does not start.
    let out = Command::new(binary("tidelock-worker"))
        .args([
            "--model",
            &model_path().to_string_lossy(),
            "--engine",
            "sim",
        ])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("TIDELOCK_CLUSTER_TOKEN")
        .env_remove("TIDELOCK_CLUSTER_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("needs the cluster credential") && stderr.contains("--no-cluster-auth"),
        "{stderr}"
    );

    // Shard 2 of 2 does not exist: the worker refuses to start, saying why.
    let out = Command::new(binary("tidelock-worker"))
        .args([
            "--model",
            &model_path().to_string_lossy(),
            "--engine",
            "sim",
            "--no-cluster-auth",
        ])
        .args(["--shards", "2", "--shard", "2", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--shard 2 of --shards 2"), "{stderr}");

    // A coordinator must know every shard of its group.
    let out = Command::new(binary("tidelock-worker"))
        .args([
            "--model",
            &model_path().to_string_lossy(),
            "--no-cluster-auth",
        ])
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
