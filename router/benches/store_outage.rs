//! What a stopped etcd adds to a new session's placement (issue #18, point 4): the time of a
//! session pin read (`Pins::get` on a cache miss) against a real etcd, while it answers, while it
//! is stopped (SIGSTOP), and after it resumes; and, for comparison, one read without the read
//! deadline (what every new session paid before: the etcd client's own 5 s timeout).
//!
//! Run: `nice cargo bench -p tidelock-router --bench store_outage` (about 20 s; needs etcd).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidelock_protocol::{KeyLayout, ModelName, SessionKey, TenantId};
use tidelock_router::sessions::{Deadlines, Pins};
use tidelock_state::testing::EtcdServer;
use tidelock_state::{EtcdStore, StateStore};

const READS: usize = 2_000;

async fn pins(server: &EtcdServer, deadlines: Deadlines) -> Pins {
    let store: Arc<dyn StateStore> = Arc::new(EtcdStore::connect(server.config()).await.unwrap());
    Pins::with_deadlines(
        store,
        KeyLayout::new(KeyLayout::DEFAULT_ROOT),
        Duration::from_secs(600),
        deadlines,
    )
}

/// Milliseconds of `n` reads of new sessions numbered from `from`, sorted.
async fn reads(pins: &Pins, from: usize, n: usize) -> Vec<f64> {
    let (model, tenant) = (ModelName::new("m").unwrap(), TenantId::new("t").unwrap());
    let mut ms = Vec::with_capacity(n);
    for i in from..from + n {
        let session = SessionKey::new(format!("s{i}")).unwrap();
        let t = Instant::now();
        let _ = pins.get(&model, &tenant, &session).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    ms
}

fn row(phase: &str, ms: &[f64]) {
    let q = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "{phase:>26}: {:>5} reads  p50 {:8.3} ms  p99 {:8.3} ms  max {:9.3} ms",
        ms.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let server = EtcdServer::start()
            .await
            .expect("etcd (apt-get install etcd-server)");
        let deadlines = Deadlines::default();
        let pins = pins(&server, deadlines).await;
        println!(
            "pin read deadline {:?}; etcd client timeout {:?}",
            deadlines.read,
            server.config().request_timeout
        );
        // Connected now: connecting checks that etcd answers.
        let undeadlined = self::pins(
            &server,
            Deadlines {
                read: Duration::from_secs(60),
                ..deadlines
            },
        )
        .await;
        row("etcd answering", &reads(&pins, 0, READS).await);
        server.pause().unwrap();
        row("etcd stopped (SIGSTOP)", &reads(&pins, READS, READS).await);
        row(
            "stopped, without deadline",
            &reads(&undeadlined, 10 * READS, 1).await,
        );
        server.resume().unwrap();
        let t = Instant::now();
        while !pins.store_reachable() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "{:>26}: {:.0} ms after SIGCONT",
            "reads again",
            t.elapsed().as_secs_f64() * 1e3
        );
        row("etcd resumed", &reads(&pins, 2 * READS, READS).await);
        let m = pins.metrics();
        println!(
            "{:>26}: {} failed or late, {} skipped while unreachable",
            "pin reads",
            m.failed.get(),
            m.skipped.get()
        );
    });
}
