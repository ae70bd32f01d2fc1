use std::collections::BTreeMap;

use super::*;

fn id(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn cand(name: &str, running: u32, device_blocks: usize) -> Candidate {
    Candidate {
        worker: id(name),
        load: LoadReport {
            running,
            prefill_tokens_per_second: 1_000.0,
            ..LoadReport::default()
        },
        in_flight: 0,
        pending_prefill: 0,
        pending_requests: 0,
        promised: 0,
        cached: TierCounts {
            device: device_blocks,
            host: 0,
            disk: 0,
        },
    }
}

fn req<'a>(prompt: usize, session: Option<&'a str>, pinned: Option<&'a WorkerId>) -> Request<'a> {
    Request {
        prompt_tokens: prompt,
        block_tokens: 64,
        work_rate: 0.0,
        session,
        pinned,
    }
}

fn first(d: &Decision) -> &str {
    d.order[0].as_str()
}

#[test]
fn ttft_formula_counts_queue_uncached_tokens_and_tier_transfer() {
    let model = CostModel::default();
    let mut c = cand("a", 0, 10);
    c.cached.host = 4;
    c.cached.disk = 2;
    c.load.prefill_tokens_waiting = 500;
    c.pending_prefill = 200; // older than the report's count: the larger one is used
    // 2,048 tokens, 16 blocks cached -> 1,024 uncached, 1.024 s at 1,000 tok/s. The queue's 0.5 s
    // hides the loads of 4 host blocks (0.5 ms each) and 2 disk blocks (5 ms each) = 12 ms.
    let t = model.ttft(&c, 2_048, 64).as_secs_f64();
    assert!((t - 1.524).abs() < 1e-9, "{t}");
    // The worker's own measurements replace the defaults: a slow disk outlasts the queue.
    c.load.disk_block_secs = 0.3;
    c.load.host_block_secs = 0.001;
    let t = model.ttft(&c, 2_048, 64).as_secs_f64();
    assert!((t - (0.604 + 1.024)).abs() < 1e-9, "{t}");
    // No speed measured yet: the default speed.
    c.load.prefill_tokens_per_second = 0.0;
    c.load.prefill_tokens_waiting = 0;
    c.pending_prefill = 0;
    let t = model.ttft(&c, 2_048, 64).as_secs_f64();
    assert!((t - (0.604 + 1_024.0 / 2_000.0)).abs() < 1e-9, "{t}");
}

/// A prefix on a worker's disk beats recomputing it elsewhere when that worker's measured load
/// time says so, and not when its disk is slower than a prefill.
#[test]
fn ttft_weighs_a_prefix_on_disk_by_the_measured_load_time() {
    let mut on_disk = cand("a", 0, 0);
    on_disk.cached.disk = 30;
    let idle = cand("b", 0, 0);
    let place = |disk_block_secs: f64| {
        let mut a = on_disk.clone();
        a.load.disk_block_secs = disk_block_secs;
        let cands = [a, idle.clone()];
        let d = decide(
            Policy::Ttft,
            &CostModel::default(),
            &req(2_048, Some("s"), None),
            &cands,
            0,
        );
        first(&d.unwrap()).to_owned()
    };
    // 30 blocks of 64 tokens: 1.92 s to recompute at 1,000 tok/s.
    assert_eq!(
        place(0.002),
        "a",
        "60 ms of loading beats 1.92 s of prefill"
    );
    assert_eq!(place(0.5), "b", "15 s of loading does not");
}

#[test]
fn ttft_sends_a_new_session_to_the_worker_holding_its_prefix() {
    let cands = [cand("a", 0, 0), cand("b", 0, 30), cand("c", 0, 10)];
    let d = decide(
        Policy::Ttft,
        &CostModel::default(),
        &req(2_048, Some("s"), None),
        &cands,
        0,
    )
    .unwrap();
    assert_eq!(first(&d), "b");
    assert_eq!(d.reason, Reason::Placed);
    // The rest in prediction order: c (10 cached) before a (none).
    assert_eq!(d.order, [id("b"), id("c"), id("a")]);
}

#[test]
fn ttft_charges_a_placement_for_the_cache_it_gives_up() {
    // a holds 30 of the prompt's 32 blocks (1,920 tokens); b is idle and holds nothing. At
    // 1,000 tokens/s: ttft(a) = (queue + 128) / 1,000, ttft(b) = 2.048 s; with weight w, b is
    // charged w * 1.92 s more for the prefix it would compute a second time.
    let a = |queue: u64| {
        let mut a = cand("a", 0, 30);
        a.load.prefill_tokens_waiting = queue;
        a
    };
    let b = cand("b", 0, 0);
    let place = |weight: f64, queue: u64| {
        // No pulls here (the next tests price them): only the charge decides.
        let model = CostModel {
            cache_weight: weight,
            peer_block_secs: f64::INFINITY,
            ..CostModel::default()
        };
        let d = decide(
            Policy::Ttft,
            &model,
            &req(2_048, None, None),
            &[a(queue), b.clone()],
            0,
        )
        .unwrap();
        first(&d).to_owned()
    };
    // A queue of 2,500 tokens: a's 2.628 s loses to b's 2.048 s on TTFT alone...
    assert_eq!(place(0.0, 2_500), "b");
    // ...but not to b's 2.048 + 1.92 = 3.968 s with the charge.
    assert_eq!(place(1.0, 2_500), "a");
    // Beyond twice the prefill saved, the queue wins again: 4.128 s > 3.968 s.
    assert_eq!(place(1.0, 4_000), "b");
    // Workers holding the same amount are not charged: the idle one wins.
    let mut c = cand("c", 0, 30);
    c.load.prefill_tokens_waiting = 0;
    let d = decide(
        Policy::Ttft,
        &CostModel::default(),
        &req(2_048, None, None),
        &[a(500), c],
        0,
    )
    .unwrap();
    assert_eq!(first(&d), "c");
}

/// Once every worker has a queue, the prefill a placement adds delays the requests queued
/// behind it: a queue difference that sends a prompt away from its prefix on a cluster with an
/// idle worker keeps it home when every worker is backlogged.
#[test]
fn ttft_keeps_prefixes_home_when_every_worker_has_a_queue() {
    // a holds 30 of the prompt's 32 blocks (1,920 of 2,048 tokens) behind a 10,000-token queue;
    // b holds nothing behind 1,000. At 1,000 tokens/s: a = 10 + 0.128 s; b = 1 + 2.048 s plus
    // the charge for the cache it gives up, 3 * 1.92 s: 8.808 s. b wins.
    let place = |waiting: [u32; 2], pending: [u32; 2]| {
        let mut a = cand("a", 0, 30);
        a.load.prefill_tokens_waiting = 10_000;
        let mut b = cand("b", 0, 0);
        b.load.prefill_tokens_waiting = 1_000;
        (a.load.waiting, b.load.waiting) = (waiting[0], waiting[1]);
        (a.pending_requests, b.pending_requests) = (pending[0], pending[1]);
        let cands = [a, b];
        let d = decide(
            Policy::Ttft,
            &CostModel::default(),
            &req(2_048, None, None),
            &cands,
            0,
        )
        .unwrap();
        let backlog = backlog(&cands, &CostModel::default(), 0.0);
        (first(&d).to_owned(), backlog)
    };
    assert_eq!(place([0, 0], [0, 0]), ("b".to_owned(), 0.0));
    // Only the holder has a queue: b is idle, nothing waits behind work placed there.
    assert_eq!(place([20, 0], [0, 0]), ("b".to_owned(), 0.0));
    // Four requests queued everywhere (the worker's report or this router's own count, the
    // larger): each waits for what a placement computes. a: 10.128 + 4 * 0.128 = 10.64 s;
    // b: 8.808 + 4 * 2.048 = 16.999 s.
    assert_eq!(place([4, 9], [0, 0]), ("a".to_owned(), 4.0));
    assert_eq!(place([0, 4], [6, 1]), ("a".to_owned(), 4.0));
}

/// Between bursts a worker may be idle while the cluster has no time to spare: the recent load
/// keeps the prefix home too. The same two workers as above, both queues empty of requests.
#[test]
fn ttft_keeps_prefixes_home_when_the_recent_load_is_near_capacity() {
    let mut a = cand("a", 0, 30);
    a.load.prefill_tokens_waiting = 10_000;
    let mut b = cand("b", 0, 0);
    b.load.prefill_tokens_waiting = 1_000;
    let cands = [a, b];
    let place = |work_rate: f64| {
        let request = Request {
            work_rate,
            ..req(2_048, None, None)
        };
        let d = decide(Policy::Ttft, &CostModel::default(), &request, &cands, 0).unwrap();
        first(&d).to_owned()
    };
    // Capacity 2,000 tokens/s. Half of it: u / (1 - u) = 1 request: a 10.256 s, b 10.856 s.
    assert_eq!(place(1_000.0), "a");
    // A quarter: 1/3 request: a 10.171 s, b 9.491 s.
    assert_eq!(place(500.0), "b");
    // At or past capacity: the cap of 99 requests.
    let model = CostModel::default();
    let most = MAX_UTILIZATION / (1.0 - MAX_UTILIZATION);
    assert_eq!(backlog(&cands, &model, 2_000.0), most);
    assert!((most - 99.0).abs() < 1e-9);
    assert_eq!(
        backlog(&cands, &model, 1e9),
        backlog(&cands, &model, 2_000.0)
    );
    assert_eq!(backlog(&cands, &model, f64::NAN), 0.0);
}

/// The backlog is the shortest queue among the workers taking requests: a draining worker's
/// does not count.
#[test]
fn the_backlog_is_the_shortest_queue_of_the_workers_taking_requests() {
    let mut a = cand("a", 0, 0);
    a.load.waiting = 3;
    let mut b = cand("b", 0, 0);
    b.pending_requests = 5;
    let mut c = cand("c", 0, 0);
    c.load.draining = true;
    let model = CostModel::default();
    assert_eq!(
        backlog(&[a.clone(), b.clone(), c.clone()], &model, 0.0),
        3.0
    );
    c.load.draining = false;
    assert_eq!(backlog(&[a, b, c], &model, 0.0), 0.0);
    assert_eq!(backlog(&[], &model, 0.0), 0.0);
}

#[test]
fn ttft_spreads_equal_scores_over_the_workers() {
    let cands = [cand("a", 0, 0), cand("b", 0, 0), cand("c", 0, 0)];
    let firsts: Vec<String> = (0..6)
        .map(|turn| {
            let d = decide(
                Policy::Ttft,
                &CostModel::default(),
                &req(640, None, None),
                &cands,
                turn,
            )
            .unwrap();
            first(&d).to_owned()
        })
        .collect();
    assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
    // A difference in score still decides, whatever the turn.
    let held = [cand("a", 0, 0), cand("b", 0, 5), cand("c", 0, 0)];
    for turn in 0..3 {
        let d = decide(
            Policy::Ttft,
            &CostModel::default(),
            &req(640, None, None),
            &held,
            turn,
        )
        .unwrap();
        assert_eq!(first(&d), "b");
    }
}

#[test]
fn ttft_keeps_the_pin_within_the_margin_and_moves_it_beyond() {
    // The predicted TTFT alone (no charge for the cache given up, no pulls), so the margin is
    // plain.
    let model = CostModel {
        cache_weight: 0.0,
        peer_block_secs: f64::INFINITY,
        ..CostModel::default()
    };
    let pin = id("a");
    // a is pinned and holds the prefix; b is idle but holds nothing: a wins anyway.
    let mut a = cand("a", 0, 30);
    let b = cand("b", 0, 0);
    let d = decide(
        Policy::Ttft,
        &model,
        &req(2_048, Some("s"), Some(&pin)),
        &[a.clone(), b.clone()],
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.reason), ("a", Reason::Pinned));

    // a has a modest queue: slower than b's full prefill, but within the margin.
    // b: 2,048 / 1,000 = 2.048 s; keep while a <= 2.048 * 1.5 + 0.05 = 3.122 s.
    a.load.prefill_tokens_waiting = 2_900; // a: (2,900 + 128) / 1,000 = 3.028 s
    let d = decide(
        Policy::Ttft,
        &model,
        &req(2_048, Some("s"), Some(&pin)),
        &[a.clone(), b.clone()],
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.reason), ("a", Reason::Pinned));

    a.load.prefill_tokens_waiting = 3_100; // a: 3.228 s > 3.122 s
    let d = decide(
        Policy::Ttft,
        &model,
        &req(2_048, Some("s"), Some(&pin)),
        &[a, b],
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.reason), ("b", Reason::Moved));
    assert_eq!(
        d.order,
        [id("b"), id("a")],
        "the old pin stays as the fallback"
    );
}

#[test]
fn ttft_reports_a_lost_pin() {
    let gone = id("z");
    let d = decide(
        Policy::Ttft,
        &CostModel::default(),
        &req(100, Some("s"), Some(&gone)),
        &[cand("a", 0, 0)],
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.reason), ("a", Reason::PinLost));
}

#[test]
fn no_candidate_no_decision() {
    for policy in [
        Policy::Ttft,
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::SessionHash,
        Policy::PrefixOnly,
    ] {
        assert_eq!(
            decide(policy, &CostModel::default(), &req(10, None, None), &[], 0),
            None
        );
    }
}

#[test]
fn round_robin_takes_turns_and_offers_every_worker() {
    let cands = [cand("c", 0, 0), cand("a", 0, 0), cand("b", 0, 0)];
    let firsts: Vec<String> = (0..6)
        .map(|turn| {
            let d = decide(
                Policy::RoundRobin,
                &CostModel::default(),
                &req(10, None, None),
                &cands,
                turn,
            )
            .unwrap();
            assert_eq!(d.order.len(), 3);
            first(&d).to_owned()
        })
        .collect();
    assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
}

#[test]
fn least_loaded_counts_reports_and_in_flight() {
    let mut a = cand("a", 5, 0);
    let b = cand("b", 2, 0);
    let d = decide(
        Policy::LeastLoaded,
        &CostModel::default(),
        &req(10, None, None),
        &[a.clone(), b.clone()],
        0,
    )
    .unwrap();
    assert_eq!(first(&d), "b");
    // The router's own in-flight count is fresher than a report that predates it.
    a.load.running = 0;
    a.in_flight = 4;
    let d = decide(
        Policy::LeastLoaded,
        &CostModel::default(),
        &req(10, None, None),
        &[a, b],
        0,
    )
    .unwrap();
    assert_eq!(first(&d), "b");
}

#[test]
fn session_hash_is_sticky_and_consistent_when_a_worker_leaves() {
    let all: Vec<Candidate> = (0..8).map(|i| cand(&format!("w{i}"), 0, 0)).collect();
    let place = |cands: &[Candidate], key: &str| {
        let d = decide(
            Policy::SessionHash,
            &CostModel::default(),
            &req(10, Some(key), None),
            cands,
            0,
        )
        .unwrap();
        assert_eq!(d.reason, Reason::Hashed);
        first(&d).to_owned()
    };
    let keys: Vec<String> = (0..2_000).map(|i| format!("session-{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| place(&all, k)).collect();
    // Sticky: the same answer again.
    assert_eq!(
        before,
        keys.iter().map(|k| place(&all, k)).collect::<Vec<_>>()
    );
    // Spread: every worker gets a fair share (expected 250 each).
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &before {
        *per.entry(w).or_default() += 1;
    }
    assert_eq!(per.len(), 8);
    assert!(per.values().all(|&n| (150..350).contains(&n)), "{per:?}");
    // w3 leaves: only its keys move.
    let rest: Vec<Candidate> = all
        .iter()
        .filter(|c| c.worker.as_str() != "w3")
        .cloned()
        .collect();
    for (key, old) in keys.iter().zip(&before) {
        let new = place(&rest, key);
        if old != "w3" {
            assert_eq!(&new, old, "{key} moved although its worker stayed");
        }
    }
}

#[test]
fn session_hash_bounds_load() {
    let mut cands: Vec<Candidate> = (0..4).map(|i| cand(&format!("w{i}"), 1, 0)).collect();
    let d = decide(
        Policy::SessionHash,
        &CostModel::default(),
        &req(10, Some("k"), None),
        &cands,
        0,
    )
    .unwrap();
    let home = d.order[0].clone();
    // Overload the key's home: average (20 + 3) / 4 = 5.75, bound 5.75 * 1.25 + 1 = 8.2.
    cands
        .iter_mut()
        .find(|c| c.worker == home)
        .unwrap()
        .load
        .running = 20;
    let d = decide(
        Policy::SessionHash,
        &CostModel::default(),
        &req(10, Some("k"), None),
        &cands,
        0,
    )
    .unwrap();
    assert_ne!(d.order[0], home);
    assert_eq!(d.reason, Reason::HashOverflow);
    assert_eq!(
        d.order.last(),
        Some(&home),
        "the overloaded home is tried last"
    );
}

#[test]
fn prefix_only_takes_the_longest_prefix_whatever_the_load() {
    let cands = [cand("a", 0, 3), cand("b", 50, 9), cand("c", 0, 0)];
    let d = decide(
        Policy::PrefixOnly,
        &CostModel::default(),
        &req(1_000, None, None),
        &cands,
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.reason), ("b", Reason::PrefixHit));
    let cold = [cand("a", 3, 0), cand("b", 1, 0)];
    let d = decide(
        Policy::PrefixOnly,
        &CostModel::default(),
        &req(1_000, None, None),
        &cold,
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.reason), ("b", Reason::PrefixMiss));
}

/// Point 3 of #21: a worker whose queue makes it the better place pulls the prefix from the
/// holder instead of recomputing it, when the worker's measured pull time says that is cheaper;
/// a slow pull recomputes, and a holder that is the best place itself pulls nothing.
#[test]
fn ttft_pulls_a_prefix_to_a_less_loaded_worker_when_the_transfer_is_cheap() {
    // a holds 30 of 32 blocks but has 10 s of prefill queued; b is idle and holds nothing.
    let mut holder = cand("a", 4, 30);
    holder.load.prefill_tokens_waiting = 10_000;
    let idle = cand("b", 0, 0);
    let decide_with = |peer_block_secs: f64| {
        let mut b = idle.clone();
        b.load.peer_block_secs = peer_block_secs;
        decide(
            Policy::Ttft,
            &CostModel {
                pull: PullWhen::Load,
                ..CostModel::default()
            },
            &req(2_048, Some("s"), None),
            &[holder.clone(), b],
            0,
        )
        .unwrap()
    };
    // 30 blocks at 2 ms = 60 ms and 128 tokens of prefill, against 10 s of queue on a.
    let d = decide_with(0.002);
    assert_eq!(first(&d), "b");
    assert_eq!(d.pull, Some((id("a"), 30)));
    // A pull slower than recomputing (1.92 s of prefill) is not made.
    let d = decide_with(0.5);
    assert_eq!(d.pull, None);
    // The holder idle: it serves the prefix itself, nothing moves.
    let mut quiet = holder.clone();
    quiet.load.prefill_tokens_waiting = 0;
    let d = decide(
        Policy::Ttft,
        &CostModel::default(),
        &req(2_048, Some("s"), None),
        &[quiet, idle.clone()],
        0,
    )
    .unwrap();
    assert_eq!((first(&d), d.pull.clone()), ("a", None));
    // By default a loaded (not draining) holder's prefix is recomputed, not pulled.
    let d = decide(
        Policy::Ttft,
        &CostModel::default(),
        &req(2_048, Some("s"), None),
        &[holder.clone(), idle.clone()],
        0,
    )
    .unwrap();
    assert_eq!(d.pull, None);
}

/// Point 4 of #21: a draining worker is never chosen, but a session's prefix it holds is pulled
/// by the worker that is (whatever the policy, nothing new goes to it).
#[test]
fn a_draining_worker_takes_nothing_but_its_blocks_move() {
    let mut leaving = cand("a", 0, 30);
    leaving.load.draining = true;
    let cands = [leaving, cand("b", 0, 0), cand("c", 0, 2)];
    for policy in [
        Policy::Ttft,
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::SessionHash,
        Policy::PrefixOnly,
    ] {
        for turn in 0..3 {
            let d = decide(
                policy,
                &CostModel::default(),
                &req(2_048, Some("s"), None),
                &cands,
                turn,
            )
            .unwrap();
            assert!(!d.order.contains(&id("a")), "{policy:?}: {d:?}");
        }
    }
    let d = decide(
        Policy::Ttft,
        &CostModel::default(),
        &req(2_048, Some("s"), Some(&id("a"))),
        &cands,
        0,
    )
    .unwrap();
    assert_eq!(d.reason, Reason::PinLost);
    assert_eq!(d.pull, Some((id("a"), 30)), "{d:?}");
    let mut all_leaving = cands.clone();
    for c in &mut all_leaving {
        c.load.draining = true;
    }
    assert!(
        decide(
            Policy::Ttft,
            &CostModel::default(),
            &req(64, None, None),
            &all_leaving,
            0
        )
        .is_none()
    );
}

#[test]
fn a_worker_that_has_not_measured_is_assumed_as_fast_as_its_measured_peers() {
    // a has measured 100,000 tokens/s and has 50,000 tokens queued; b is fresh (reports 0).
    let mut a = cand("a", 0, 0);
    a.load.prefill_tokens_per_second = 100_000.0;
    a.load.prefill_tokens_waiting = 50_000;
    let mut b = cand("b", 0, 0);
    b.load.prefill_tokens_per_second = 0.0;
    let model = CostModel::default();
    let d = decide(
        Policy::Ttft,
        &model,
        &req(10_000, None, None),
        &[a.clone(), b.clone()],
        0,
    )
    .unwrap();
    // At the 2,000 tokens/s default b would take 5 s against a's 0.6 s; at a's speed, 0.1 s.
    assert_eq!(first(&d), "b");
    assert_eq!(
        model
            .calibrated(&[a.clone(), b.clone()])
            .default_prefill_tps,
        100_000.0
    );
    // Nobody measured: the default stands.
    a.load.prefill_tokens_per_second = 0.0;
    assert_eq!(model.calibrated(&[a, b]).default_prefill_tps, 2_000.0);
}
