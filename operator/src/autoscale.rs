//! The operator's autoscaler for `spec.autoscaling`: shard groups from the workers' own load.
//!
//! Every pass (the Model is reconciled at least every [`SAMPLE_PERIOD`] while autoscaled) reads
//! the load report (`GET /v1/load`, with the cluster credential) of each group's coordinator,
//! found through its registration in etcd, and turns it into a recommendation as Kubernetes'
//! HorizontalPodAutoscaler does: `ceil(groups x ratio)`, where the ratio is the larger of the
//! mean prompt tokens waiting to be prefilled per group over `targetWaitingPrefillTokens` and the
//! mean KV cache in use over `targetKvUtilizationPercent`, ignored within 10% of 1, and bounded
//! by `minReplicas`/`maxReplicas`. Recommendations are kept per Model; a change happens only
//! when it held for its stabilisation window (the lowest recommendation over the up window,
//! the highest over the down window; a window not yet covered by samples, e.g. after the
//! operator restarted, holds the change back) and the last change is a cool-down old.
//! A group without a report counts as idle for adding groups and blocks removing them.
//!
//! Scaling down removes the least-loaded groups: `spec.replicas` is lowered and their
//! StatefulSets are deleted in the same pass, so the reconciler keeps the others (group indices
//! need not be contiguous). Every change is an Event (`ScaledUp`, `ScaledDown`), a counter
//! and `status.lastScale`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tidelock_api::model::Autoscaling;
use tidelock_protocol::LoadReport;

/// How often an autoscaled Model is looked at.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(15);
/// How long one load report may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Ratios this close to 1 change nothing (as the HorizontalPodAutoscaler's tolerance).
const TOLERANCE: f64 = 0.1;

/// One group's load, from its coordinator's report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupLoad {
    pub waiting_prefill_tokens: u64,
    /// KV blocks held by running requests over the group's blocks, 0 to 1.
    pub kv_used: f64,
}

impl GroupLoad {
    pub fn from_report(report: &LoadReport) -> Self {
        GroupLoad {
            waiting_prefill_tokens: report.prefill_tokens_waiting,
            kv_used: if report.kv_total_blocks == 0 {
                0.0
            } else {
                report.kv_used_blocks as f64 / report.kv_total_blocks as f64
            },
        }
    }

    /// How loaded the group is against the targets (the larger of the two ratios).
    fn pressure(&self, spec: &Autoscaling) -> f64 {
        let waiting =
            self.waiting_prefill_tokens as f64 / spec.target_waiting_prefill_tokens.max(1) as f64;
        let kv = self.kv_used * 100.0 / f64::from(spec.target_kv_utilization_percent.max(1));
        waiting.max(kv)
    }
}

/// What one look at the load recommends.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub groups: i32,
    /// The load against the targets, in words.
    pub why: String,
}

/// The groups `loads` call for (`None`: a group without a report), from `current` groups.
pub fn recommend(
    current: i32,
    spec: &Autoscaling,
    loads: &BTreeMap<String, Option<GroupLoad>>,
) -> Recommendation {
    let bound = |n: i32| n.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    let known: Vec<&GroupLoad> = loads.values().flatten().collect();
    let missing = loads.len() - known.len();
    // Missing reports count as idle groups (for adding); they block removing (below).
    let n = loads.len().max(1) as f64;
    let waiting = known
        .iter()
        .map(|l| l.waiting_prefill_tokens as f64)
        .sum::<f64>()
        / n;
    let kv = known.iter().map(|l| l.kv_used).sum::<f64>() / n;
    let ratio = (waiting / spec.target_waiting_prefill_tokens.max(1) as f64)
        .max(kv * 100.0 / f64::from(spec.target_kv_utilization_percent.max(1)));
    let why = format!(
        "{waiting:.0} prompt tokens waiting per group (target {}), {:.0}% of KV cache in use (target {}%){}",
        spec.target_waiting_prefill_tokens,
        kv * 100.0,
        spec.target_kv_utilization_percent,
        if missing > 0 {
            format!(", {missing} groups without a load report")
        } else {
            String::new()
        }
    );
    let wanted = if current == 0 || (ratio - 1.0).abs() <= TOLERANCE {
        current
    } else {
        (f64::from(current) * ratio).ceil() as i32
    };
    let wanted = if wanted < current && missing > 0 {
        current
    } else {
        wanted
    };
    Recommendation {
        groups: bound(wanted),
        why,
    }
}

/// Recommendations of one Model over time.
#[derive(Debug, Default)]
struct History {
    samples: VecDeque<(Instant, i32)>,
}

impl History {
    /// Records `groups` at `now` and returns what the windows allow from `current`: up to the
    /// lowest recommendation of the up window, down to the highest of the down window, each
    /// only once samples cover its whole window.
    fn stabilize(&mut self, now: Instant, groups: i32, current: i32, spec: &Autoscaling) -> i32 {
        self.samples.push_back((now, groups));
        let up = Duration::from_secs(spec.scale_up_stabilization_seconds.max(0) as u64);
        let down = Duration::from_secs(spec.scale_down_stabilization_seconds.max(0) as u64);
        let keep = up.max(down) + SAMPLE_PERIOD * 2;
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
        let over = |window: Duration| {
            let covered = self
                .samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= window);
            let within = self
                .samples
                .iter()
                .filter(move |(t, _)| now.duration_since(*t) <= window)
                .map(|(_, g)| *g);
            covered.then_some(within)
        };
        if groups > current {
            match over(up).and_then(|w| w.min()) {
                Some(lowest) => lowest.max(current),
                None => current,
            }
        } else if groups < current {
            match over(down).and_then(|w| w.max()) {
                Some(highest) => highest.min(current),
                None => current,
            }
        } else {
            current
        }
    }
}

/// The autoscaler's memory (recommendations per Model) and its client for load reports.
pub struct Autoscaler {
    history: Mutex<HashMap<String, History>>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Autoscaler {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REPORT_TIMEOUT));
        Autoscaler {
            history: Mutex::default(),
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
        }
    }
}

impl std::fmt::Debug for Autoscaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Autoscaler").finish_non_exhaustive()
    }
}

impl Autoscaler {
    /// Records `recommended` for the Model `key` and returns the groups to have now.
    pub fn stabilize(
        &self,
        key: &str,
        recommended: i32,
        current: i32,
        spec: &Autoscaling,
        now: Instant,
    ) -> i32 {
        let mut history = self.history.lock().expect("autoscaler history");
        history
            .entry(key.to_owned())
            .or_default()
            .stabilize(now, recommended, current, spec)
    }

    /// Forgets a Model (deleted, or no longer autoscaled).
    pub fn forget(&self, key: &str) {
        self.history.lock().expect("autoscaler history").remove(key);
    }

    /// The load report at `address` (a worker's base URL), or why there is none.
    pub async fn load(&self, address: &str, token: Option<&str>) -> Result<LoadReport, LoadError> {
        let uri: hyper::Uri = format!("{}/v1/load", address.trim_end_matches('/'))
            .parse()
            .map_err(|source| LoadError::Address {
                address: address.to_owned(),
                source,
            })?;
        let mut request = hyper::Request::get(uri);
        if let Some(token) = token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::new())?;
        let fetch = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                return Err(LoadError::Status(status));
            }
            Ok(serde_json::from_slice(&body)?)
        };
        tokio::time::timeout(REPORT_TIMEOUT, fetch)
            .await
            .map_err(|_| LoadError::Timeout(REPORT_TIMEOUT))?
    }
}

/// Why a worker's load report could not be had (logged; the group then counts as unreported).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The registered address does not make a URL.
    #[error("{address}: {source}")]
    Address {
        address: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    /// The request could not be built (a token that is not a valid header value).
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    /// No response: connection refused, reset...
    #[error("{0}")]
    Connect(#[from] hyper_util::client::legacy::Error),
    /// The response body broke off.
    #[error("{0}")]
    Body(#[from] hyper::Error),
    /// The worker answered with an error status.
    #[error("{0}")]
    Status(hyper::StatusCode),
    /// The body is not a load report.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Nothing within the limit.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The groups to remove to go from `loads.len()` groups down to `keep`: the least loaded
/// (lowest pressure, then highest index), never one without a report.
pub fn least_loaded(
    loads: &BTreeMap<String, Option<GroupLoad>>,
    keep: usize,
    spec: &Autoscaling,
) -> Vec<String> {
    let mut known: Vec<(&String, f64)> = loads
        .iter()
        .filter_map(|(name, load)| load.map(|l| (name, l.pressure(spec))))
        .collect();
    known.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(a.0)));
    known
        .into_iter()
        .take(loads.len().saturating_sub(keep))
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: i32, max: i32) -> Autoscaling {
        Autoscaling {
            min_replicas: min,
            max_replicas: max,
            target_waiting_prefill_tokens: 1000,
            target_kv_utilization_percent: 50,
            scale_up_stabilization_seconds: 30,
            scale_down_stabilization_seconds: 120,
            cooldown_seconds: 60,
        }
    }

    fn loads(each: &[(u64, f64)]) -> BTreeMap<String, Option<GroupLoad>> {
        each.iter()
            .enumerate()
            .map(|(i, &(w, kv))| {
                (
                    format!("m-g{i}"),
                    Some(GroupLoad {
                        waiting_prefill_tokens: w,
                        kv_used: kv,
                    }),
                )
            })
            .collect()
    }

    #[test]
    fn the_busier_of_queue_and_memory_sets_the_groups() {
        let s = spec(1, 8);
        // 3000 waiting per group against 1000: three times the groups.
        assert_eq!(
            recommend(2, &s, &loads(&[(3000, 0.1), (3000, 0.1)])).groups,
            6
        );
        // KV at 75% against 50%: half again.
        assert_eq!(recommend(2, &s, &loads(&[(0, 0.75), (0, 0.75)])).groups, 3);
        // Within 10% of the targets: no change.
        assert_eq!(
            recommend(2, &s, &loads(&[(1050, 0.2), (950, 0.2)])).groups,
            2
        );
        // Idle: down to the minimum, bounded.
        assert_eq!(recommend(4, &s, &loads(&[(0, 0.0); 4])).groups, 1);
        assert_eq!(recommend(2, &s, &loads(&[(90_000, 0.0); 2])).groups, 8);
        let r = recommend(2, &s, &loads(&[(3000, 0.1), (1000, 0.3)]));
        assert_eq!(
            r.why,
            "2000 prompt tokens waiting per group (target 1000), 20% of KV cache in use (target 50%)"
        );
    }

    #[test]
    fn a_group_without_a_report_blocks_removal_and_counts_idle_for_adding() {
        let s = spec(1, 8);
        let mut l = loads(&[(0, 0.0), (0, 0.0)]);
        l.insert("m-g2".into(), None);
        assert_eq!(recommend(3, &s, &l).groups, 3);
        let mut l = loads(&[(6000, 0.0), (0, 0.0)]);
        l.insert("m-g2".into(), None);
        // 2000 per group over three groups: six.
        assert_eq!(recommend(3, &s, &l).groups, 6);
    }

    #[test]
    fn changes_wait_for_their_windows() {
        let s = spec(1, 8);
        let mut h = History::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // Up: the recommendation must hold for 30 s, and the lowest one over it is taken.
        assert_eq!(h.stabilize(at(0), 4, 2, &s), 2);
        assert_eq!(h.stabilize(at(15), 5, 2, &s), 2);
        assert_eq!(h.stabilize(at(30), 6, 2, &s), 4);
        // A dip inside the window holds it back to the dip.
        assert_eq!(h.stabilize(at(45), 3, 4, &s), 4);
        // Down: 120 s of lower recommendations, the highest of them taken.
        let mut h = History::default();
        for (i, g) in [2, 1, 1, 1, 1, 1, 1, 1].into_iter().enumerate() {
            let now = h.stabilize(at(i as u64 * 15), g, 3, &s);
            assert_eq!(now, 3, "{i}: the window is not covered yet");
        }
        assert_eq!(h.stabilize(at(120), 1, 3, &s), 2, "2 is within the window");
        assert_eq!(h.stabilize(at(135), 1, 3, &s), 1);
    }

    #[test]
    fn scale_down_removes_the_least_loaded_groups() {
        let s = spec(1, 8);
        let l = loads(&[(500, 0.1), (0, 0.05), (2000, 0.0), (0, 0.05)]);
        // g1 and g3 tie: the higher index goes first.
        assert_eq!(least_loaded(&l, 3, &s), ["m-g3"]);
        assert_eq!(least_loaded(&l, 2, &s), ["m-g3", "m-g1"]);
        let mut l = l;
        l.insert("m-g4".into(), None);
        assert!(!least_loaded(&l, 2, &s).contains(&"m-g4".to_owned()));
    }

    #[tokio::test]
    async fn a_report_that_cannot_be_had_says_why() {
        let autoscaler = Autoscaler::default();
        let error = autoscaler.load("http://bad host", None).await.unwrap_err();
        assert!(matches!(error, LoadError::Address { .. }), "{error}");
        assert!(
            error.to_string().starts_with("http://bad host: "),
            "{error}"
        );
        // Nothing listens on port 1 of loopback.
        let error = autoscaler
            .load("http://127.0.0.1:1", None)
            .await
            .unwrap_err();
        assert!(matches!(error, LoadError::Connect(_)), "{error}");
    }
}
