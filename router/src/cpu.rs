//! The bounded pool that a request's CPU-heavy preparation runs on: parsing its JSON, rendering
//! the chat template, tokenizing, hashing its blocks.
//!
//! That work grows with the request (a 20 MB message took 28 s and 2 GB to tokenize), so on the
//! async threads two such requests stalled every other request and `/healthz`. Here it runs on
//! tokio's blocking threads, admitted by [`CpuPool::run`] under three bounds:
//!
//! - **Jobs at once**: at most `threads`; the async threads only ever wait.
//! - **Each tenant's share**: at most `per_tenant` of a tenant's jobs run at once; its others
//!   wait in its own queue, so one tenant's burst never stands in front of another tenant.
//! - **Memory**: each job reserves what it may allocate (the caller's estimate, from its input's
//!   size) from a budget, and waits until it fits; a job larger than the budget is refused
//!   before it starts.
//!
//! And one rule so that large jobs, whoever sends them, cannot fill the pool: a job is **large**
//! when its reservation is more than a `threads`-th of a quarter of the budget, and large jobs
//! together hold at most three quarters of the threads and of the budget. The last quarter is
//! for small jobs (an ordinary chat turn reserves a few MB), which therefore start at once while
//! any number of tenants send the largest requests the router accepts (as long as fewer than a
//! quarter of the threads' worth of small jobs run already). Their CPU time is then shared by the
//! kernel with the large jobs' threads, not queued behind them.
//!
//! What this bounds: the router's memory for preparation stays under the budget (plus the
//! bodies of requests waiting for their turn, which the body limit and connection limits bound).
//!
//! One exception: a job that reserves at most [`CpuLimits::inline_bytes`] (a short request's
//! parse or tokenization, microseconds of work) runs at once on the calling thread. Handing it
//! to a blocking thread and back would cost more than the job: two context switches per job.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The pool's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimits {
    /// Jobs running at once (blocking threads used).
    pub threads: usize,
    /// Jobs of one tenant running at once.
    pub per_tenant: usize,
    /// Bytes all running jobs may reserve together.
    pub memory_bytes: u64,
    /// Jobs reserving at most this run at once on the calling thread, outside the pool: a short
    /// prompt's parse or tokenization takes microseconds, less than the two thread hand-offs a
    /// pool job costs (a context switch to the blocking thread and one back, per job, twice per
    /// request). 0: every job goes to the pool.
    pub inline_bytes: u64,
}

impl Default for CpuLimits {
    /// Eight threads (more than this machine's cores: the kernel shares the CPU between a small
    /// job and the large ones, which is what keeps small jobs fast), two per tenant, 4 GiB.
    fn default() -> Self {
        CpuLimits {
            threads: 8,
            per_tenant: 2,
            memory_bytes: 4 << 30,
            inline_bytes: INLINE_BYTES,
        }
    }
}

impl CpuLimits {
    /// The largest reservation a job may make: what large jobs may hold together.
    pub fn largest_job(&self) -> u64 {
        self.memory_bytes - self.small_reserve()
    }

    /// The budget kept for small jobs (a quarter).
    fn small_reserve(&self) -> u64 {
        self.memory_bytes / 4
    }

    /// Reservations up to this are small jobs.
    fn small_job(&self) -> u64 {
        self.small_reserve() / self.threads.max(1) as u64
    }

    /// Threads large jobs may hold together (at least one, and one left for small jobs when
    /// there are two or more).
    fn large_threads(&self) -> usize {
        (self.threads - self.threads / 4).clamp(1, self.threads.saturating_sub(1).max(1))
    }
}

/// Why a job was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CpuRefusal {
    #[error(
        "this request needs an estimated {needed} bytes of memory to prepare; the router prepares at most {limit} at once"
    )]
    TooLarge { needed: u64, limit: u64 },
    #[error("the router is shutting down")]
    ShuttingDown,
}

/// [`CpuLimits::inline_bytes`] by default: a body of up to 16 KiB parsed (16 bytes reserved a
/// byte), or about 300 bytes of text tokenized (512 a byte, plus 64 KiB for the request's other
/// fields): an ordinary short request, prepared in tens of microseconds.
pub const INLINE_BYTES: u64 = 256 << 10;

/// Memory is reserved in KiB so that budgets of terabytes fit a semaphore's `u32` permits.
const UNIT: u64 = 1024;

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

/// The pool. Cheap to share (`Arc` it); `K` names a tenant.
#[derive(Debug)]
pub struct CpuPool<K> {
    limits: CpuLimits,
    threads: Arc<Semaphore>,
    large_threads: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    large_memory: Arc<Semaphore>,
    /// Each tenant's share (tenants are authenticated, so this map is as long as their list).
    tenants: Mutex<HashMap<K, Arc<Semaphore>>>,
}

/// What a job's run reports besides its result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ran {
    /// From asking to starting.
    pub waited: Duration,
    /// On its thread.
    pub ran: Duration,
    pub large: bool,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> CpuPool<K> {
    pub fn new(limits: CpuLimits) -> Self {
        let limits = CpuLimits {
            threads: limits.threads.max(1),
            per_tenant: limits.per_tenant.max(1),
            memory_bytes: limits.memory_bytes.max(UNIT),
            inline_bytes: limits.inline_bytes,
        };
        let memory = units(limits.memory_bytes) as usize;
        let large_memory = units(limits.largest_job()) as usize;
        CpuPool {
            threads: Arc::new(Semaphore::new(limits.threads)),
            large_threads: Arc::new(Semaphore::new(limits.large_threads())),
            memory: Arc::new(Semaphore::new(memory)),
            large_memory: Arc::new(Semaphore::new(large_memory)),
            tenants: Mutex::new(HashMap::new()),
            limits,
        }
    }

    pub fn limits(&self) -> CpuLimits {
        self.limits
    }

    /// Runs `job` for `tenant` on a blocking thread once the bounds admit it, reserving
    /// `reserve_bytes` of the memory budget while it runs. Refused at once when the reservation
    /// can never fit. Dropping the future while it waits gives up its place; a job that started
    /// runs to its end (its result is then dropped).
    pub async fn run<T, F>(
        &self,
        tenant: &K,
        reserve_bytes: u64,
        job: F,
    ) -> Result<(T, Ran), CpuRefusal>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let limit = self.limits.largest_job();
        if reserve_bytes > limit {
            return Err(CpuRefusal::TooLarge {
                needed: reserve_bytes,
                limit,
            });
        }
        let asked = Instant::now();
        if reserve_bytes <= self.limits.inline_bytes {
            let output = job();
            let ran = asked.elapsed();
            return Ok((
                output,
                Ran {
                    waited: Duration::ZERO,
                    ran,
                    large: false,
                },
            ));
        }
        let large = reserve_bytes > self.limits.small_job();
        let share = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            let per_tenant = self.limits.per_tenant;
            tenants
                .entry(tenant.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(per_tenant)))
                .clone()
        };
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::with_capacity(5);
        permits.push(closed_is_unreachable(share.acquire_owned().await));
        let amount = units(reserve_bytes);
        if large {
            permits.push(closed_is_unreachable(
                self.large_memory.clone().acquire_many_owned(amount).await,
            ));
            permits.push(closed_is_unreachable(
                self.large_threads.clone().acquire_owned().await,
            ));
        }
        permits.push(closed_is_unreachable(
            self.memory.clone().acquire_many_owned(amount).await,
        ));
        permits.push(closed_is_unreachable(
            self.threads.clone().acquire_owned().await,
        ));
        let waited = asked.elapsed();
        let output = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let output = job();
            // Everything is given back when the work is done, not when the caller looks: a
            // caller that left does not free its tenant's share while its job still runs.
            drop(permits);
            (output, started.elapsed())
        })
        .await;
        match output {
            Ok((output, ran)) => Ok((output, Ran { waited, ran, large })),
            // The job panicked: the same as if it had run here.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(CpuRefusal::ShuttingDown),
        }
    }

    /// Jobs of `tenant` past their tenant's share: running, or waiting for a thread or memory.
    pub fn tenant_running(&self, tenant: &K) -> usize {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.get(tenant).map_or(0, |s| {
            self.limits.per_tenant - s.available_permits().min(self.limits.per_tenant)
        })
    }
}

/// The semaphores are never closed.
fn closed_is_unreachable<P>(permit: Result<P, tokio::sync::AcquireError>) -> P {
    permit.expect("the pool's semaphores are never closed")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// A job that holds its thread until released through the returned sender.
    fn blocker(running: &Arc<AtomicUsize>) -> (impl FnOnce() + Send + 'static, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel::<()>();
        let running = running.clone();
        let job = move || {
            running.fetch_add(1, Ordering::SeqCst);
            let _ = rx.recv();
            running.fetch_sub(1, Ordering::SeqCst);
        };
        (job, tx)
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_runs_at_most_its_share_and_never_blocks_another() {
        let pool = Arc::new(CpuPool::<&'static str>::new(CpuLimits {
            threads: 4,
            per_tenant: 2,
            memory_bytes: 1 << 30,
            inline_bytes: 0,
        }));
        let running = Arc::new(AtomicUsize::new(0));
        let mut releases = Vec::new();
        let mut tasks = Vec::new();
        // Tenant "greedy" asks for six jobs at once.
        for _ in 0..6 {
            let (job, release) = blocker(&running);
            releases.push(release);
            let pool = pool.clone();
            tasks.push(tokio::spawn(
                async move { pool.run(&"greedy", 1024, job).await },
            ));
        }
        until("two of greedy's jobs running", || {
            running.load(Ordering::SeqCst) == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(running.load(Ordering::SeqCst), 2, "only its share runs");
        assert_eq!(pool.tenant_running(&"greedy"), 2);
        // Another tenant's job starts while greedy's four others still wait.
        let (result, _) = pool.run(&"polite", 1024, || 41 + 1).await.unwrap();
        assert_eq!(result, 42);
        assert_eq!(pool.tenant_running(&"polite"), 0);
        // Greedy's queue drains as its jobs end.
        for release in releases {
            release.send(()).unwrap();
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(pool.tenant_running(&"greedy"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_jobs_leave_room_for_small_ones_and_too_large_ones_are_refused() {
        let limits = CpuLimits {
            threads: 4,
            per_tenant: 4,
            memory_bytes: 64 << 20,
            inline_bytes: 0,
        };
        let pool = Arc::new(CpuPool::<u32>::new(limits));
        // Three quarters of 64 MiB for large jobs together; small jobs reserve at most 4 MiB.
        assert_eq!(limits.largest_job(), 48 << 20);
        let refused = pool.run(&0, (48 << 20) + 1, || ()).await.unwrap_err();
        assert_eq!(
            refused,
            CpuRefusal::TooLarge {
                needed: (48 << 20) + 1,
                limit: 48 << 20
            }
        );
        assert!(refused.to_string().contains("50331649 bytes"), "{refused}");
        let running = Arc::new(AtomicUsize::new(0));
        // Tenants 1..=4 each send a large job of 20 MiB: two fit the large budget, and they
        // never take the threads or memory kept for small jobs.
        let mut releases = Vec::new();
        let mut tasks = Vec::new();
        for tenant in 1..=4u32 {
            let (job, release) = blocker(&running);
            releases.push(release);
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.run(&tenant, 20 << 20, job).await
            }));
        }
        until("two large jobs running", || {
            running.load(Ordering::SeqCst) == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(running.load(Ordering::SeqCst), 2);
        // A small job of a fifth tenant runs at once.
        let ((), ran) = pool.run(&5, 1 << 20, || ()).await.unwrap();
        assert!(!ran.large);
        for release in releases {
            release.send(()).unwrap();
        }
        for task in tasks {
            assert!(task.await.unwrap().unwrap().1.large);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_panics_its_caller_and_frees_its_place() {
        let pool = Arc::new(CpuPool::<u8>::new(CpuLimits {
            threads: 1,
            per_tenant: 1,
            memory_bytes: 1 << 20,
            inline_bytes: 0,
        }));
        let p = pool.clone();
        let panicked = tokio::spawn(async move { p.run(&1, 10, || panic!("boom")).await }).await;
        assert!(panicked.unwrap_err().is_panic());
        let (v, _) = pool.run(&1, 10, || 7).await.unwrap();
        assert_eq!(v, 7);
        assert_eq!(pool.tenant_running(&1), 0);
    }

    /// A job within `inline_bytes` runs at once on the caller's thread, whatever the pool's
    /// queues hold; a larger one goes to a pool thread.
    #[tokio::test]
    async fn small_jobs_run_inline() {
        let pool = CpuPool::<u8>::new(CpuLimits {
            inline_bytes: 4096,
            ..CpuLimits::default()
        });
        let here = std::thread::current().id();
        let (there, ran) = pool
            .run(&1, 4096, || std::thread::current().id())
            .await
            .unwrap();
        assert_eq!(there, here);
        assert_eq!(ran.waited, Duration::ZERO);
        let (there, _) = pool
            .run(&1, 4097, || std::thread::current().id())
            .await
            .unwrap();
        assert_ne!(there, here);
    }
}
