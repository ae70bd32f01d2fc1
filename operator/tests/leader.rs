//! Leader election on a Lease, against the mocked API server and (with `KUBECONFIG`) a real
//! cluster: of two replicas exactly one leads; when the leader stops renewing (a crash) the
//! other takes over once the lease has expired, not before; a leader that shuts down releases
//! the lease and the standby takes over well within one lease duration; two candidates racing
//! for a free lease cannot both win.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use support::Harness;
use tidelock_operator::leader::{Elector, Timing};
use tokio::sync::watch;

flows!(
    exactly_one_leads_and_the_standby_takes_over_after_expiry,
    a_released_lease_is_taken_over_at_once,
    racing_candidates_cannot_both_win,
);

const TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(3),
    renew_deadline: Duration::from_secs(2),
    retry: Duration::from_millis(200),
};

struct Candidate {
    leading: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn candidate(h: &Harness, identity: &str) -> Candidate {
    let api: Api<Lease> = h.api();
    let elector = Elector::new(api, "tidelock-operator", identity, TIMING);
    let (tx, leading) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(elector.run(tx, tidelock_operator::run::stopped(stop_rx)));
    Candidate {
        leading,
        stop,
        task,
    }
}

/// Samples both candidates until one leads; panics if both ever lead at once. Returns the
/// index of the leader.
async fn one_leader(c: &[Candidate; 2], at_least: Duration) -> usize {
    let started = Instant::now();
    let mut leader = None;
    while leader.is_none() || started.elapsed() < at_least {
        let l = [*c[0].leading.borrow(), *c[1].leading.borrow()];
        assert!(!(l[0] && l[1]), "both candidates lead at once");
        if let Some(i) = l.iter().position(|x| *x) {
            assert!(
                leader.is_none_or(|j| j == i),
                "leadership changed hands while both ran"
            );
            leader = Some(i);
        }
        assert!(started.elapsed() < Duration::from_secs(20), "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leader.unwrap()
}

async fn holder(h: &Harness) -> Option<String> {
    h.api::<Lease>()
        .get("tidelock-operator")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
}

async fn exactly_one_leads_and_the_standby_takes_over_after_expiry(h: Harness) {
    let c = [candidate(&h, "operator-a"), candidate(&h, "operator-b")];
    // Several lease durations with both running: exactly one leads throughout.
    let leader = one_leader(&c, TIMING.lease_duration * 2).await;
    let standby = 1 - leader;
    let names = ["operator-a", "operator-b"];
    assert_eq!(holder(&h).await.as_deref(), Some(names[leader]));

    // The leader crashes: it neither renews nor releases.
    c[leader].task.abort();
    let crashed = Instant::now();
    let mut leading = c[standby].leading.clone();
    tokio::time::timeout(Duration::from_secs(20), leading.wait_for(|l| *l))
        .await
        .expect("the standby takes over")
        .unwrap();
    let took = crashed.elapsed();
    eprintln!(
        "standby took over {took:?} after the leader crashed (lease {:?})",
        TIMING.lease_duration
    );
    // Not before the lease could have expired (the last renewal was at most one retry earlier).
    assert!(
        took >= TIMING.lease_duration - TIMING.retry,
        "took over after {took:?}"
    );
    assert_eq!(holder(&h).await.as_deref(), Some(names[standby]));
    let lease = h
        .api::<Lease>()
        .get("tidelock-operator")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(lease.lease_transitions, Some(1));
    c[standby].stop.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        for c in c {
            let _ = c.task.await;
        }
    })
    .await;
    h.finish().await;
}

async fn a_released_lease_is_taken_over_at_once(h: Harness) {
    let c = [candidate(&h, "operator-a"), candidate(&h, "operator-b")];
    let leader = one_leader(&c, Duration::ZERO).await;
    let standby = 1 - leader;
    // Graceful shutdown: the leader stops and releases the lease.
    c[leader].stop.send_replace(true);
    let stopped = Instant::now();
    let mut was_leading = c[leader].leading.clone();
    let mut leading = c[standby].leading.clone();
    tokio::time::timeout(Duration::from_secs(20), leading.wait_for(|l| *l))
        .await
        .expect("the standby takes over")
        .unwrap();
    let took = stopped.elapsed();
    eprintln!("standby took over {took:?} after the leader released the lease");
    assert!(
        !*was_leading.borrow_and_update(),
        "the stopped leader no longer leads"
    );
    assert!(
        took < TIMING.lease_duration,
        "a released lease is taken without waiting for expiry: {took:?}"
    );
    c[standby].stop.send_replace(true);
    for c in c {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.task).await;
    }
    h.finish().await;
}

async fn racing_candidates_cannot_both_win(h: Harness) {
    let api: Api<Lease> = h.api();
    for round in 0..5 {
        let mut a = Elector::new(api.clone(), format!("race-{round}"), "operator-a", TIMING);
        let mut b = Elector::new(api.clone(), format!("race-{round}"), "operator-b", TIMING);
        let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra ^ rb,
            "round {round}: exactly one wins the free lease (a {ra}, b {rb})"
        );
        // The loser keeps losing while the winner renews.
        let (winner, loser) = if ra {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        assert!(winner.try_acquire_or_renew().await.unwrap());
        assert!(!loser.try_acquire_or_renew().await.unwrap());
    }
    h.finish().await;
}
