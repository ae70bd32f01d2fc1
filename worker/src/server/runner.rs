//! The engine's thread: the single owner of the engine, fed by a command channel.
//!
//! The model's math blocks a core for milliseconds at a time, so it runs on a plain thread, not
//! on the async runtime. When idle it sleeps on the channel; when busy it drains commands between
//! steps. After every step it publishes the pool's KV events to the [`EventLog`] and the current
//! load to a watch channel, so HTTP handlers never touch the engine.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tidelock_protocol::blocks::BlockLayout;
use tidelock_protocol::{BlockHash, Epoch, GenerateRequest, KvEventBatch, KvSnapshot};
use tokio::sync::{Notify, oneshot, watch};

use crate::engine::executor::Executor;
use crate::engine::{Engine, EngineLoad, EventSink, Export, PullJob};
use crate::kv::tier::disk::DiskReader;
use crate::server::metrics::Metrics;

/// What handlers ask of the engine thread.
#[derive(Debug)]
pub enum Command {
    Generate {
        /// Boxed: a request is far larger than the other commands.
        request: Box<GenerateRequest>,
        out: EventSink,
    },
    /// A snapshot consistent with the event log: taken after publishing all pending events.
    Snapshot(oneshot::Sender<KvSnapshot>),
    /// A peer's pull: the leading blocks of a chain this worker holds.
    Export {
        hashes: Vec<BlockHash>,
        reply: oneshot::Sender<Exported>,
    },
    /// What a pull from a peer brought (see [`Engine::pulled`]).
    Pulled {
        arrived: Vec<(BlockHash, bytes::Bytes)>,
        missed: Vec<BlockHash>,
        /// Seconds of the transfer per block.
        secs: f64,
    },
    /// Blocks a draining peer handed over, checked (see [`Engine::adopt`]); the answer is how
    /// many this worker holds now.
    Adopt {
        blocks: Vec<(BlockHash, bytes::Bytes)>,
        reply: oneshot::Sender<usize>,
    },
    /// Drain (SIGTERM): hand back what waits, finish what runs (until `deadline`), write the
    /// cache through to the disk tier, then answer `done`; all along, and after until
    /// [`Command::Shutdown`], the thread keeps serving peers' pulls and snapshots.
    Drain {
        deadline: std::time::Instant,
        done: oneshot::Sender<Drained>,
    },
    Shutdown,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Waiting requests handed back to the routers.
    pub handed_back: usize,
    /// Running requests that had not finished by the deadline (failed).
    pub cut_off: usize,
    /// Blocks the disk tier holds of the cache afterwards.
    pub persisted: usize,
}

/// The engine's answer to [`Command::Export`].
#[derive(Debug)]
pub struct Exported {
    pub blocks: Vec<Export>,
    /// The layout of the blocks (None: this worker cannot export).
    pub layout: Option<BlockLayout>,
    /// For the blocks on disk.
    pub disk: Option<DiskReader>,
}

/// Recent KV event batches, for routers that follow the stream.
#[derive(Debug)]
pub struct EventLog {
    epoch: Epoch,
    batches: Mutex<VecDeque<KvEventBatch>>,
    capacity: usize,
    notify: Notify,
}

/// The batches asked for are no longer retained: resync from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl EventLog {
    pub fn new(epoch: Epoch, capacity: usize) -> Self {
        EventLog {
            epoch,
            batches: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            notify: Notify::new(),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn push(&self, batch: KvEventBatch) {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        batches.push_back(batch);
        while batches.len() > self.capacity {
            batches.pop_front();
        }
        drop(batches);
        self.notify.notify_waiters();
    }

    /// Batches with a sequence number above `after`, or [`Gone`] if some were dropped.
    pub fn since(&self, after: u64) -> Result<Vec<KvEventBatch>, Gone> {
        let batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        match batches.front() {
            Some(first) if first.sequence > after + 1 => Err(Gone),
            _ => Ok(batches
                .iter()
                .filter(|b| b.sequence > after)
                .cloned()
                .collect()),
        }
    }

    /// A future that resolves after the next push, registered now (so a push between a check and
    /// the wait is not missed).
    pub fn subscribe(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut notified = Box::pin(self.notify.notified());
        notified.as_mut().enable();
        notified
    }
}

/// Starts the engine thread.
pub fn spawn<E: Executor + 'static>(
    mut engine: Engine<E>,
    events: Arc<EventLog>,
    load: watch::Sender<EngineLoad>,
    metrics: Arc<Metrics>,
    pulls: tokio::sync::mpsc::UnboundedSender<PullJob>,
) -> (Sender<Command>, JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(&mut engine, &rx, &events, &load, &metrics, &pulls))
        .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
    (tx, handle)
}

fn run<E: Executor>(
    engine: &mut Engine<E>,
    rx: &Receiver<Command>,
    events: &EventLog,
    load: &watch::Sender<EngineLoad>,
    metrics: &Metrics,
    pulls: &tokio::sync::mpsc::UnboundedSender<PullJob>,
) {
    // A drain under way: its deadline, whom to tell, how many requests it handed back.
    let mut drain: Option<(std::time::Instant, oneshot::Sender<Drained>, usize)> = None;
    loop {
        // A drain ends when what ran has finished (or its deadline passed); meanwhile commands
        // are served as always, peers' pulls of this worker's blocks among them.
        if let Some((deadline, _, _)) = &drain
            && (engine.is_idle() || std::time::Instant::now() >= *deadline)
            && let Some((_, done, handed_back)) = drain.take()
        {
            let _ = done.send(end_drain(engine, events, load, handed_back));
        }
        // Block while idle; otherwise take whatever arrived since the last step.
        let first = if engine.is_idle() {
            match rx.recv() {
                Ok(command) => Some(command),
                Err(_) => return,
            }
        } else {
            None
        };
        let mut commands: Vec<Command> = first.into_iter().collect();
        loop {
            match rx.try_recv() {
                Ok(command) => commands.push(command),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        for command in commands {
            match command {
                Command::Generate { request, out } => engine.submit(*request, out),
                Command::Snapshot(reply) => {
                    publish(engine, events, load);
                    let _ = reply.send(engine.snapshot());
                }
                Command::Export { hashes, reply } => {
                    let _ = reply.send(Exported {
                        blocks: engine.export(&hashes),
                        layout: engine.executor().block_layout(),
                        disk: engine.tiers().disk_reader(),
                    });
                }
                Command::Pulled {
                    arrived,
                    missed,
                    secs,
                } => engine.pulled(arrived, &missed, secs),
                Command::Adopt { blocks, reply } => {
                    let _ = reply.send(engine.adopt(blocks));
                }
                Command::Drain { deadline, done } => {
                    let handed_back = engine.drain();
                    tracing::info!(
                        handed_back,
                        running = engine.running(),
                        "draining: queued requests handed back, running ones finishing"
                    );
                    drain = Some((deadline, done, handed_back));
                }
                Command::Shutdown => {
                    persist(engine);
                    return;
                }
            }
        }
        if !engine.is_idle() {
            let started = std::time::Instant::now();
            match engine.step() {
                Ok(stats) => metrics.record_step(&stats, started.elapsed()),
                Err(error) => {
                    // Not a bad request (those are rejected at submit): a shard of the group that
                    // is down, a bug or a broken installation. Fail every request (routers retry
                    // them elsewhere) and keep serving.
                    metrics.step_failures.inc();
                    tracing::error!(%error, "engine step failed; failing the running requests");
                    engine.fail_all(&error.to_string());
                }
            }
        }
        for job in engine.take_pulls() {
            // Without a puller (its runtime gone) the blocks stay loading until the request
            // is cancelled; the server always runs one.
            if let Err(job) = pulls.send(job) {
                engine.pulled(Vec::new(), &job.0.hashes, 0.0);
            }
        }
        publish(engine, events, load);
    }
}

/// Ends a drain: fails what still runs (its deadline passed) and writes the cache through to
/// the disk tier.
fn end_drain<E: Executor>(
    engine: &mut Engine<E>,
    events: &EventLog,
    load: &watch::Sender<EngineLoad>,
    handed_back: usize,
) -> Drained {
    let cut_off = engine.running();
    if cut_off > 0 {
        engine.fail_all("the worker's drain deadline passed before the answer ended");
    }
    let persisted = persist(engine);
    publish(engine, events, load);
    Drained {
        handed_back,
        cut_off,
        persisted,
    }
}

/// Writes the cached blocks through to the disk tier before the worker exits, and waits for
/// the writes; how many blocks the disk holds of them.
fn persist<E: Executor>(engine: &mut Engine<E>) -> usize {
    if !engine.tiers().enabled() {
        return 0;
    }
    let started = std::time::Instant::now();
    let kept = engine.persist();
    let flushed = engine.tiers().flush(std::time::Duration::from_secs(60));
    tracing::info!(
        blocks = kept,
        flushed,
        secs = started.elapsed().as_secs_f64(),
        "KV cache written to the disk tier"
    );
    kept
}

fn publish<E: Executor>(
    engine: &mut Engine<E>,
    events: &EventLog,
    load: &watch::Sender<EngineLoad>,
) {
    if let Some(batch) = engine.take_events() {
        events.push(batch);
    }
    let _ = load.send(engine.load());
}
