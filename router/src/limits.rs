//! Per-tenant limits: requests per minute, tokens per minute, requests in flight, context length.
//!
//! The two rates are token buckets that hold one minute's allowance and refill continuously, so a
//! tenant may burst up to its per-minute limit and then proceeds at the limit's pace. A request
//! is charged its prompt plus its `max_tokens` when admitted (the most it can cost) and refunded
//! what it did not generate when it ends (all of it when it never reached a worker). All limits are checked before anything is charged, so
//! a rejected request costs nothing. The context limit is applied earlier, when the request is
//! tokenized (it caps `max_tokens` and refuses longer prompts). Limits are per router replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidelock_protocol::{TenantId, TenantLimits};

/// A limit a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Over `requests_per_minute`; retry after the given time.
    Requests { limit: u32, retry_after: Duration },
    /// Over `tokens_per_minute`; retry after the given time.
    Tokens { limit: u64, retry_after: Duration },
    /// Over `max_concurrent`.
    Concurrency { limit: u32 },
    /// The request alone needs more tokens than a minute allows: it can never be admitted.
    TooLarge { cost: u64, limit: u64 },
}

impl Exceeded {
    /// What the client should wait before retrying (`Retry-After`), `None` when waiting cannot help.
    pub fn retry_after(&self) -> Option<Duration> {
        match *self {
            Exceeded::Requests { retry_after, .. } | Exceeded::Tokens { retry_after, .. } => {
                Some(retry_after)
            }
            Exceeded::Concurrency { .. } => Some(Duration::from_secs(1)),
            Exceeded::TooLarge { .. } => None,
        }
    }

    /// Metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Exceeded::Requests { .. } => "requests_per_minute",
            Exceeded::Tokens { .. } => "tokens_per_minute",
            Exceeded::Concurrency { .. } => "max_concurrent",
            Exceeded::TooLarge { .. } => "tokens_per_minute",
        }
    }
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Requests { limit, retry_after } => write!(
                f,
                "Rate limit reached: {limit} requests per minute. Retry in {:.1} s.",
                retry_after.as_secs_f64()
            ),
            Exceeded::Tokens { limit, retry_after } => write!(
                f,
                "Rate limit reached: {limit} tokens per minute. Retry in {:.1} s.",
                retry_after.as_secs_f64()
            ),
            Exceeded::Concurrency { limit } => write!(
                f,
                "Too many concurrent requests: at most {limit} at a time."
            ),
            Exceeded::TooLarge { cost, limit } => write!(
                f,
                "This request may use {cost} tokens (prompt plus max_tokens), more than the {limit} tokens per minute allowed; lower max_tokens or shorten the prompt."
            ),
        }
    }
}

/// A bucket holding up to one minute's allowance.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(per_minute: f64, now: Instant) -> Self {
        Bucket {
            level: per_minute,
            updated: now,
        }
    }

    fn refill(&mut self, per_minute: f64, now: Instant) {
        let secs = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + secs * per_minute / 60.0).min(per_minute);
        self.updated = now;
    }

    /// Time until `cost` is available (zero when it is).
    fn wait_for(&self, cost: f64, per_minute: f64) -> Duration {
        let missing = cost - self.level;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing * 60.0 / per_minute)
        }
    }
}

#[derive(Debug)]
struct Usage {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u32,
}

#[derive(Debug, Default)]
struct Inner {
    tenants: HashMap<TenantId, Usage>,
}

/// Every tenant's current use, shared by all requests.
#[derive(Debug, Default, Clone)]
pub struct Limiter {
    inner: Arc<Mutex<Inner>>,
}

impl Limiter {
    /// Admits a request of `tenant` that may cost `cost_tokens` (prompt plus `max_tokens`), or
    /// says which limit it exceeds. The returned guard holds a concurrency slot until dropped.
    pub fn admit(
        &self,
        tenant: &TenantId,
        limits: &TenantLimits,
        cost_tokens: u64,
        now: Instant,
    ) -> Result<Admission, Exceeded> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let usage = inner.tenants.entry(tenant.clone()).or_insert(Usage {
            requests: None,
            tokens: None,
            in_flight: 0,
        });
        if let Some(limit) = limits.max_concurrent
            && usage.in_flight >= limit
        {
            return Err(Exceeded::Concurrency { limit });
        }
        let rpm = limits.requests_per_minute.map(f64::from);
        let tpm = limits.tokens_per_minute.map(|t| t as f64);
        if let Some(limit) = limits.tokens_per_minute
            && cost_tokens > limit
        {
            return Err(Exceeded::TooLarge {
                cost: cost_tokens,
                limit,
            });
        }
        let requests = rpm.map(|per_minute| {
            let b = usage
                .requests
                .get_or_insert_with(|| Bucket::full(per_minute, now));
            b.refill(per_minute, now);
            b.wait_for(1.0, per_minute)
        });
        let tokens = tpm.map(|per_minute| {
            let b = usage
                .tokens
                .get_or_insert_with(|| Bucket::full(per_minute, now));
            b.refill(per_minute, now);
            b.wait_for(cost_tokens as f64, per_minute)
        });
        if let (Some(limit), Some(wait)) = (limits.requests_per_minute, requests)
            && !wait.is_zero()
        {
            return Err(Exceeded::Requests {
                limit,
                retry_after: wait,
            });
        }
        if let (Some(limit), Some(wait)) = (limits.tokens_per_minute, tokens)
            && !wait.is_zero()
        {
            return Err(Exceeded::Tokens {
                limit,
                retry_after: wait,
            });
        }
        if let Some(b) = usage.requests.as_mut().filter(|_| rpm.is_some()) {
            b.level -= 1.0;
        }
        if let Some(b) = usage.tokens.as_mut().filter(|_| tpm.is_some()) {
            b.level -= cost_tokens as f64;
        }
        usage.in_flight += 1;
        Ok(Admission {
            limiter: self.clone(),
            tenant: tenant.clone(),
            charged: cost_tokens,
            used: 0,
            per_minute: tpm,
        })
    }
}

/// An admitted request: holds its concurrency slot and its token charge until dropped. What it
/// did not use is refunded then: everything, unless [`Admission::settle`] said otherwise (a
/// request that never reached a worker costs no tokens).
#[derive(Debug)]
pub struct Admission {
    limiter: Limiter,
    tenant: TenantId,
    charged: u64,
    used: u64,
    per_minute: Option<f64>,
}

impl Admission {
    /// Records what the request really used (prompt plus generated tokens); the difference to
    /// the charge is refunded when the admission is dropped.
    pub fn settle(&mut self, used_tokens: u64) {
        self.used = used_tokens.min(self.charged);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut inner = self.limiter.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(usage) = inner.tenants.get_mut(&self.tenant) {
            usage.in_flight = usage.in_flight.saturating_sub(1);
            if let (Some(per_minute), Some(bucket)) = (self.per_minute, usage.tokens.as_mut()) {
                bucket.level = (bucket.level + (self.charged - self.used) as f64).min(per_minute);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        TenantId::new("t").unwrap()
    }

    #[test]
    fn requests_per_minute_bursts_then_refills_at_the_limits_pace() {
        let l = Limiter::default();
        let limits = TenantLimits {
            requests_per_minute: Some(3),
            ..TenantLimits::default()
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(l.admit(&tenant(), &limits, 10, t0).unwrap());
        }
        let e = l.admit(&tenant(), &limits, 10, t0).unwrap_err();
        // One request every 20 s.
        assert_eq!(
            e,
            Exceeded::Requests {
                limit: 3,
                retry_after: Duration::from_secs(20)
            }
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(20)));
        let e = l
            .admit(&tenant(), &limits, 10, t0 + Duration::from_secs(15))
            .unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(5)));
        assert!(
            l.admit(&tenant(), &limits, 10, t0 + Duration::from_secs(20))
                .is_ok()
        );
        // Another tenant is not affected.
        let other = TenantId::new("u").unwrap();
        assert!(l.admit(&other, &limits, 10, t0).is_ok());
    }

    #[test]
    fn tokens_are_charged_up_front_and_refunded_when_settled() {
        let l = Limiter::default();
        let limits = TenantLimits {
            tokens_per_minute: Some(1_000),
            ..TenantLimits::default()
        };
        let t0 = Instant::now();
        let mut a = l.admit(&tenant(), &limits, 600, t0).unwrap();
        // 400 left: a 600-token request must wait for 200 tokens = 12 s.
        let e = l.admit(&tenant(), &limits, 600, t0).unwrap_err();
        assert_eq!(e.as_str(), "tokens_per_minute");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(12)));
        // The first request used only 250 of its 600: 350 come back.
        a.settle(250);
        drop(a);
        assert!(l.admit(&tenant(), &limits, 600, t0).is_ok());
        // A request that never ran (no worker took it) costs nothing.
        drop(l.admit(&tenant(), &limits, 400, t0).unwrap());
        assert!(l.admit(&tenant(), &limits, 400, t0).is_ok());
        // A request larger than the whole minute can never pass, and says so.
        let e = l.admit(&tenant(), &limits, 1_001, t0).unwrap_err();
        assert_eq!(
            e,
            Exceeded::TooLarge {
                cost: 1_001,
                limit: 1_000
            }
        );
        assert_eq!(e.retry_after(), None);
    }

    #[test]
    fn concurrency_slots_return_when_requests_end() {
        let l = Limiter::default();
        let limits = TenantLimits {
            max_concurrent: Some(2),
            requests_per_minute: Some(100),
            ..TenantLimits::default()
        };
        let t0 = Instant::now();
        let a = l.admit(&tenant(), &limits, 1, t0).unwrap();
        let _b = l.admit(&tenant(), &limits, 1, t0).unwrap();
        assert_eq!(
            l.admit(&tenant(), &limits, 1, t0).unwrap_err(),
            Exceeded::Concurrency { limit: 2 }
        );
        drop(a);
        assert!(l.admit(&tenant(), &limits, 1, t0).is_ok());
    }

    #[test]
    fn a_rejected_request_costs_nothing() {
        let l = Limiter::default();
        let limits = TenantLimits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(100),
            ..TenantLimits::default()
        };
        let t0 = Instant::now();
        let _a = l.admit(&tenant(), &limits, 100, t0).unwrap();
        // Rejected on tokens: its request must not be counted.
        for _ in 0..20 {
            assert_eq!(
                l.admit(&tenant(), &limits, 50, t0).unwrap_err().as_str(),
                "tokens_per_minute"
            );
        }
        // 30 s later half the tokens are back, and 9 requests remain in the bucket.
        assert!(
            l.admit(&tenant(), &limits, 50, t0 + Duration::from_secs(30))
                .is_ok()
        );
    }

    #[test]
    fn no_limits_admit_everything() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let held: Vec<_> = (0..1_000)
            .map(|_| {
                l.admit(&tenant(), &TenantLimits::default(), 1 << 40, t0)
                    .unwrap()
            })
            .collect();
        assert_eq!(held.len(), 1_000);
    }
}
