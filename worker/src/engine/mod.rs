//! The engine: continuous batching of many sequences over one executor and one block pool.
//!
//! Each [`Engine::step`] builds one batch, iteration by iteration (Orca-style):
//! 1. every running sequence that is decoding gets its one token first, so a long prefill never
//!    starves decodes;
//! 2. running sequences still prefilling get chunks from what is left of the step's token budget
//!    (chunked prefill);
//! 3. waiting sequences are admitted in arrival order while budget, running slots and blocks
//!    last. Admission looks the prompt's block hashes up in the prefix cache and only computes the
//!    uncached suffix: that is the lossless reuse everything else in Tidelock is built around.
//!
//! When a shard of the group restarts (issue #7), its blocks are gone: every running sequence is
//! preempted the same way and the prefix cache is cleared.
//!
//! When a decode needs a block and none can be freed, the most recently admitted other sequence
//! is preempted by recompute: its blocks are released (its full blocks stay in the prefix cache,
//! so re-admission usually finds them again) and it goes back to the front of the queue. Requests
//! whose receiver has gone away are cancelled at the next step. The waiting queue is bounded; a
//! request beyond it is rejected at once with [`ErrorCode::Overloaded`].
//!
//! The engine is synchronous and single-owner: the server runs it on its own thread.

pub mod executor;
pub mod grammar;
pub mod logits;
pub mod sampling;
pub mod sim;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tidelock_protocol::{
    BlockHash, BlockId, BlockTokens, ErrorCode, FinishReason, GenerateEvent, GenerateRequest,
    HashChain, KvEvent, KvEventBatch, KvSnapshot, ModelName, Tier, Usage,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::kv::pool::{BlockPool, OutOfBlocks, PoolStats};
use crate::kv::tier::{self, TierStats, Tiers};
use crate::model::ModelError;
use executor::{Executor, Work};
use grammar::{Grammars, Guide};
use logits::StepLogits;
use sampling::{Choice, Sampler};

/// Scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: ModelName,
    pub block_tokens: BlockTokens,
    /// Tokens computed per step at most (decodes plus prefill chunks).
    pub max_step_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Requests waiting for admission at most; beyond it requests are rejected.
    pub max_waiting: usize,
    /// Prompt plus completion tokens at most.
    pub max_context: usize,
    pub vocab_size: usize,
    /// End-of-sequence tokens (ignored when a request sets `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
}

/// Where the generated events of one request go. Dropping the receiver cancels the request.
pub type EventSink = UnboundedSender<GenerateEvent>;

#[derive(Debug)]
struct Sequence {
    /// Unique in this engine, in arrival order.
    id: u64,
    request: GenerateRequest,
    tokens: Vec<u32>,
    prompt_len: usize,
    chain: HashChain,
    blocks: Vec<BlockId>,
    /// Tokens whose keys and values are in the KV store.
    computed: usize,
    /// Leading blocks that are in the prefix cache (acquired from it or committed to it).
    committed: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    cached_tokens: Option<usize>,
    /// Prompt tokens found cached (in any tier, or coming from a peer) when it arrived: until
    /// admission looks again, the queue counts only the rest as prefill to do.
    expected_cached: usize,
    sampler: Sampler,
    completion: u32,
    /// Which answer of its request it is (`SamplingParams::n`), from 0.
    choice: u32,
    /// The id of answer 0, when the request asked for several: the key of their [`Tally`].
    group: Option<u64>,
    /// Set once `Finished` has been sent; the sequence is released at the end of the step.
    done: bool,
    out: EventSink,
}

/// What the answers of one request for several have sent between them: the prompt's accounting
/// goes out once, `Finished` only after the last answer's `Ended`, with the sum of their tokens.
#[derive(Debug, Default)]
struct Tally {
    /// Answers not ended yet.
    open: u32,
    completion: u32,
    /// Whether `Prefilled` went out, and the cached prompt tokens it reported.
    prefilled: bool,
    cached: u32,
}

impl Sequence {
    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Prefill tokens still to compute, as the load report counts them: a waiting request's
    /// cached prefix is not work (the router's `ttft` policy would otherwise see the worker
    /// holding a prompt's prefix as busier than it is, and send the prompt away from it).
    fn to_prefill(&self) -> usize {
        self.tokens.len() - self.computed.max(self.expected_cached)
    }
}

/// A step's plan for one running sequence, named by its id (positions in `running` shift when
/// a sequence is preempted while the plan is made).
#[derive(Debug, Clone, Copy)]
struct Planned {
    id: u64,
    len: usize,
}

/// What a step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    pub sequences: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub preempted: usize,
    /// KV blocks were lost (a shard restarted): the cache was cleared and the running sequences
    /// requeued for recompute.
    pub kv_lost: bool,
}

/// Counts for the load report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    pub running: usize,
    pub waiting: usize,
    pub waiting_prefill_tokens: usize,
    pub blocks: PoolStats,
    pub tiers: TierStats,
}

/// Continuous batching over an executor.
#[derive(Debug)]
pub struct Engine<E> {
    cfg: EngineConfig,
    pool: BlockPool,
    exec: E,
    tiers: Tiers,
    /// Blocks to pull from peers, for the server to fetch (issue #21, point 3).
    pulls: Vec<PullJob>,
    /// Draining (shutdown): new requests and queued ones are handed back for the router to
    /// place elsewhere; running ones finish.
    draining: bool,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// The next sequence's id.
    next_id: u64,
    /// Requests for several answers with answers still running, by their answer 0's id.
    groups: HashMap<u64, Tally>,
    /// Compiles constraints (structured outputs); `None`: this engine takes none.
    grammars: Option<Arc<Grammars>>,
}

/// Blocks a waiting request needs from a peer worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullJob {
    /// The peer's base URL.
    pub from: String,
    /// The blocks, in chain order.
    pub hashes: Vec<BlockHash>,
}

/// What this worker holds of a chain a peer asked for, in chain order.
#[derive(Debug, Clone)]
pub enum Export {
    /// The block's bytes (it was in memory).
    Bytes(BlockHash, bytes::Bytes),
    /// The block is on the disk tier: read it with [`Tiers::disk_reader`] off this thread.
    OnDisk(BlockHash),
}

/// Waiting requests looked at for admission: the first whose lower-tier blocks are staged goes
/// in, so one request waiting on the disk does not hold up those behind it.
const ADMIT_SCAN: usize = 64;

/// Staged lower-tier blocks beyond which, when a waiting request is cancelled, those no waiting
/// request wants are dropped.
const STAGED_PRUNE: usize = 256;

impl<E: Executor> Engine<E> {
    pub fn new(cfg: EngineConfig, pool: BlockPool, exec: E) -> Self {
        Engine {
            cfg,
            pool,
            exec,
            tiers: Tiers::none(),
            pulls: Vec::new(),
            draining: false,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            groups: HashMap::new(),
            grammars: None,
        }
    }

    /// Takes constrained requests (`SamplingParams::constraint`), compiled by `grammars`
    /// (`None`: they are refused).
    pub fn with_grammars(mut self, grammars: Option<Arc<Grammars>>) -> Self {
        self.grammars = grammars;
        self
    }

    /// Spills evicted blocks to `tiers` and loads them back (issue #21). Their layout must be
    /// the executor's.
    pub fn with_tiers(mut self, tiers: Tiers) -> Self {
        // What a restarted worker found on disk opens its event stream, as its snapshot shows.
        let found = tiers.blocks();
        for tier in [Tier::Host, Tier::Disk] {
            let blocks: Vec<BlockHash> = found
                .iter()
                .filter(|(_, t)| *t == tier)
                .map(|(h, _)| *h)
                .collect();
            if !blocks.is_empty() {
                self.pool.record([KvEvent::Stored {
                    parent: None,
                    blocks,
                    tier,
                }]);
            }
        }
        self.tiers = tiers;
        self
    }

    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// Pulls requested since the last call, for the server to carry out.
    pub fn take_pulls(&mut self) -> Vec<PullJob> {
        std::mem::take(&mut self.pulls)
    }

    /// What a pull brought: blocks that arrived checked (each with its share of the transfer's
    /// seconds), and those that did not.
    pub fn pulled(
        &mut self,
        arrived: Vec<(BlockHash, bytes::Bytes)>,
        missed: &[BlockHash],
        secs: f64,
    ) {
        for (hash, bytes) in arrived {
            self.tiers.arrived(hash, bytes, secs);
        }
        self.tiers.missed(missed);
    }

    /// The leading blocks of `chain` this worker holds, for a peer: from memory (copied out of
    /// the store or the host tier) or on disk; stops at the first it does not hold.
    pub fn export(&mut self, chain: &[BlockHash]) -> Vec<Export> {
        let mut out = Vec::new();
        for &hash in chain {
            if let Some(block) = self.pool.cached_block(&hash) {
                let mut bytes = Vec::new();
                if self.exec.export_block(block, &mut bytes).is_err() {
                    break;
                }
                out.push(Export::Bytes(hash, bytes.into()));
                continue;
            }
            match self.tiers.tier_of(&hash) {
                Some(Tier::Host) => match self.tiers.host_bytes(&hash) {
                    Some(bytes) => out.push(Export::Bytes(hash, bytes)),
                    None => break,
                },
                Some(Tier::Disk) => out.push(Export::OnDisk(hash)),
                _ => break,
            }
        }
        out
    }

    /// Blocks a draining peer handed over (issue #21, point 4), checked by the caller. Each goes
    /// into a free block of the store while there is one, then to the first lower tier (as an
    /// evicted block would), and without lower tiers into the store's least recently used
    /// block: the sessions they carry are about to arrive here. Returns how many of `blocks`
    /// this worker holds afterwards (those it held already included).
    pub fn adopt(&mut self, blocks: Vec<(BlockHash, bytes::Bytes)>) -> usize {
        let mut kept = 0;
        for (hash, bytes) in blocks {
            if self.pool.cached_block(&hash).is_some() || self.tiers.tier_of(&hash).is_some() {
                kept += 1;
                continue;
            }
            if self.pool.free() == 0 && self.tiers.enabled() {
                self.tiers.demote(hash, |out| {
                    out.extend_from_slice(&bytes);
                    Ok(())
                });
                kept += usize::from(self.tiers.tier_of(&hash).is_some());
                continue;
            }
            let Ok(block) = self.allocate(1) else {
                break; // Every block is in use by running requests.
            };
            if let Err(error) = self.exec.import_block(block[0], &bytes) {
                tracing::warn!(%hash, %error, "cannot import a handed-over KV block");
                self.pool.release(&block);
                continue;
            }
            self.pool.commit(None, &block, &[hash]);
            self.pool.release(&block);
            kept += 1;
        }
        kept
    }

    /// The KV events since the last call, the lower tiers' with the pool's, as one batch.
    pub fn take_events(&mut self) -> Option<KvEventBatch> {
        self.pool.record(self.tiers.take_events());
        self.pool.take_events()
    }

    /// Every cached block on every tier, consistent with [`Engine::take_events`] when called
    /// right after it.
    pub fn snapshot(&self) -> KvSnapshot {
        self.pool.snapshot(&self.tiers.blocks())
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    pub fn load(&self) -> EngineLoad {
        EngineLoad {
            running: self.running.len(),
            waiting: self.waiting.len(),
            waiting_prefill_tokens: self
                .waiting
                .iter()
                .chain(&self.running)
                .map(Sequence::to_prefill)
                .sum(),
            blocks: self.pool.stats(),
            tiers: self.tiers.stats(),
        }
    }

    /// Whether there is anything to do.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Starts draining (issue #21, point 4): every request still waiting, and every request
    /// submitted from now on, is answered `overloaded` before its first token, which a router
    /// takes as "try another worker"; running requests finish. Returns how many were handed back.
    pub fn drain(&mut self) -> usize {
        self.draining = true;
        let handed = self.waiting.len();
        for seq in self.waiting.drain(..) {
            self.pool.release(&seq.blocks);
            let _ = seq.out.send(GenerateEvent::Error {
                code: ErrorCode::Overloaded,
                message: "the worker is draining (shutting down); another worker takes it".into(),
            });
        }
        handed
    }

    /// Requests running (not waiting).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Queues a request. Invalid or unservable requests get an `Error` event on `out` at once.
    pub fn submit(&mut self, request: GenerateRequest, out: EventSink) {
        if self.draining {
            let _ = out.send(GenerateEvent::Error {
                code: ErrorCode::Overloaded,
                message: "the worker is draining (shutting down); another worker takes it".into(),
            });
            return;
        }
        if let Err((code, message)) = self.validate(&request) {
            let _ = out.send(GenerateEvent::Error { code, message });
            return;
        }
        let guides = match self.guides(&request) {
            Ok(guides) => guides,
            Err(message) => {
                let _ = out.send(GenerateEvent::Error {
                    code: ErrorCode::InvalidRequest,
                    message,
                });
                return;
            }
        };
        let mut guides = guides.into_iter();
        let mut chain = HashChain::new(&self.cfg.model, &request.cache_salt, self.cfg.block_tokens);
        chain.extend(&request.tokens);
        // Blocks on a lower tier start loading now, while the request waits; those only a peer
        // holds (the router's hint) are pulled meanwhile.
        let reusable = reusable(
            &chain,
            request.tokens.len(),
            self.cfg.block_tokens.as_usize(),
        );
        let device = self.pool.cached_prefix(reusable);
        self.tiers.fetch(&reusable[device..]);
        let have = device + self.tiers.reach(&reusable[device..]);
        // Blocks that a request ahead of it computes are there by the time it is admitted.
        let computing = self
            .waiting
            .iter()
            .chain(&self.running)
            .map(|s| shared_prefix(s.chain.hashes(), reusable))
            .max()
            .unwrap_or(0);
        let mut expected = have.max(computing);
        if let Some(hint) = &request.pull {
            let want = (hint.blocks as usize).min(reusable.len());
            expected = expected.max(want);
            if want > have {
                let hashes = self.tiers.expect(&reusable[have..want]);
                if !hashes.is_empty() {
                    self.pulls.push(PullJob {
                        from: hint.from.clone(),
                        hashes,
                    });
                }
            }
        }
        let n = request.sampling.n.max(1);
        let group = (n > 1).then_some(self.next_id + 1);
        if let Some(id) = group {
            let tally = Tally {
                open: n,
                ..Tally::default()
            };
            self.groups.insert(id, tally);
        }
        // Answers after the first wait for the first's prompt blocks (see `admit`): the prompt
        // is computed once, and the queue counts it once.
        let bt = self.cfg.block_tokens.as_usize();
        let all = reusable.len();
        let siblings: Vec<GenerateRequest> = (1..n).map(|_| request.clone()).collect();
        let mut chain = Some(chain);
        for (request, choice) in std::iter::once(request).chain(siblings).zip(0..) {
            self.next_id += 1;
            let expected = if choice == 0 { expected } else { all };
            let chain = match choice + 1 == n {
                true => chain.take(),
                false => chain.clone(),
            }
            .expect("the last answer takes the chain");
            self.waiting.push_back(Sequence {
                id: self.next_id,
                tokens: request.tokens.clone(),
                prompt_len: request.tokens.len(),
                chain,
                blocks: Vec::new(),
                computed: 0,
                committed: 0,
                cached_tokens: None,
                expected_cached: expected * bt,
                sampler: {
                    let sampler = Sampler::for_choice(&request.sampling, choice);
                    match guides.next() {
                        Some(guide) => sampler.with_guide(guide),
                        None => sampler,
                    }
                },
                completion: 0,
                choice,
                group,
                done: false,
                out: out.clone(),
                request,
            });
        }
    }

    /// One guide per answer when the request is constrained (the grammar compiled once); none
    /// when it is not.
    fn guides(&self, request: &GenerateRequest) -> Result<Vec<Guide>, String> {
        let Some(constraint) = &request.sampling.constraint else {
            return Ok(Vec::new());
        };
        let grammars = self.grammars.as_ref().ok_or_else(|| {
            format!(
                "{}: this worker has no tokenizer to constrain its output with",
                constraint.param()
            )
        })?;
        let first = grammars.guide(constraint).map_err(|e| e.to_string())?;
        let more: Vec<Guide> = (1..request.sampling.n.max(1))
            .map(|_| first.fork())
            .collect();
        Ok(std::iter::once(first).chain(more).collect())
    }

    fn validate(&self, request: &GenerateRequest) -> Result<(), (ErrorCode, String)> {
        let invalid = |m: String| (ErrorCode::InvalidRequest, m);
        request
            .sampling
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        if request.tokens.is_empty() {
            return Err(invalid("the prompt has no tokens".into()));
        }
        let sampling = &request.sampling;
        let mut named = (request.tokens.iter().map(|&id| ("token id", id)))
            .chain(
                sampling
                    .stop_token_ids
                    .iter()
                    .map(|&id| ("stop token id", id)),
            )
            .chain(
                sampling
                    .logit_bias
                    .keys()
                    .map(|&id| ("logit_bias token id", id)),
            );
        if let Some((what, bad)) = named.find(|&(_, id)| id as usize >= self.cfg.vocab_size) {
            return Err(invalid(format!(
                "{what} {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let bt = self.cfg.block_tokens.as_usize();
        let capacity = self.pool.stats().total * bt;
        let limit = self.cfg.max_context.min(capacity);
        if request.tokens.len() >= limit {
            return Err((
                ErrorCode::ContextTooLong,
                format!(
                    "the prompt has {} tokens; this worker serves at most {} (context {}, KV capacity {})",
                    request.tokens.len(),
                    limit - 1,
                    self.cfg.max_context,
                    capacity
                ),
            ));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err((
                ErrorCode::Overloaded,
                format!(
                    "{} requests are already waiting; try again later",
                    self.waiting.len()
                ),
            ));
        }
        Ok(())
    }

    /// Runs one iteration. Returns what it did; all zeros when there was nothing to run.
    ///
    /// Four phases: [`Self::plan`] the batch (decodes, prefill chunks, admissions, preempting
    /// when blocks run out), execute it on the executor, [`Self::recover`] when that lost KV
    /// blocks (a shard restarted), else [`Self::commit`] the tokens chosen.
    pub fn step(&mut self) -> Result<StepStats, ModelError> {
        self.tiers.poll(None);
        self.reap_cancelled();
        let mut stats = StepStats::default();
        let plan = self.plan(&mut stats);
        if plan.is_empty() {
            if self.tiers.loading() {
                // Every admissible request waits on a disk read: wait for one, not in a spin.
                self.tiers.poll(Some(std::time::Duration::from_millis(2)));
            }
            return Ok(stats);
        }
        // Positions are stable from here to the end of the step: nothing is preempted or
        // retired until `commit` is done with them.
        let at: Vec<usize> = plan.iter().map(|p| self.position(p.id)).collect();
        let work: Vec<Work<'_>> = plan
            .iter()
            .zip(&at)
            .map(|(p, &index)| {
                let seq = &self.running[index];
                Work {
                    tokens: &seq.tokens[seq.computed..seq.computed + p.len],
                    start: seq.computed,
                    table: &seq.blocks,
                    wants_logits: seq.computed + p.len == seq.tokens.len(),
                }
            })
            .collect();
        let result = self.exec.run(&work);
        drop(work);
        match result {
            Ok(logits) => self.commit(&plan, &at, logits, &mut stats)?,
            Err(e) if e.loses_kv() => self.recover(&e, &mut stats),
            Err(e) => return Err(e),
        }
        Ok(stats)
    }

    /// The step's batch, within its token budget: every decoding sequence's next token first
    /// (a long prefill never starves decodes), then prefill chunks of admitted sequences, then
    /// admissions in arrival order while budget, running slots and blocks last.
    fn plan(&mut self, stats: &mut StepStats) -> Vec<Planned> {
        let mut budget = self.cfg.max_step_tokens;
        let mut plan: Vec<Planned> = Vec::new();
        // 1. Decodes first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            if self.running[i].remaining() == 1 {
                let upto = self.running[i].computed + 1;
                // When the sequence itself is preempted, `i` already points at the next one.
                if let Some(index) = self.ensure_blocks(i, upto, &mut plan, &mut budget, stats) {
                    let id = self.running[index].id;
                    plan.push(Planned { id, len: 1 });
                    budget -= 1;
                    i = index + 1;
                }
            } else {
                i += 1;
            }
        }
        // 2. Prefill chunks of admitted sequences.
        for index in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let id = self.running[index].id;
            if self.running[index].remaining() > 1 && !plan.iter().any(|p| p.id == id) {
                let len = self.grow_for_prefill(index, budget);
                if len > 0 {
                    plan.push(Planned { id, len });
                    budget -= len;
                }
            }
        }
        // 3. Admissions.
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(len) = self.admit(budget) else { break };
            let id = self.running.last().map_or(0, |s| s.id);
            plan.push(Planned { id, len });
            budget -= len;
        }
        plan
    }

    /// A shard restarted: blocks the prefix cache names are gone, and every running sequence
    /// lost context. Nothing is answered wrong or lost: the sequences go back to the queue to be
    /// recomputed (their tokens so far are kept), and the cache forgets everything (a Cleared
    /// event tells the routers).
    fn recover(&mut self, e: &ModelError, stats: &mut StepStats) {
        for index in (0..self.running.len()).rev() {
            self.preempt(index);
            stats.preempted += 1;
        }
        for seq in &mut self.waiting {
            if seq.completion == 0 {
                // Not reported yet: the prompt is now computed, not served from cache.
                seq.cached_tokens = None;
            }
        }
        self.pool.clear_cache();
        stats.kv_lost = true;
        tracing::warn!(error = %e, recomputed = stats.preempted, "KV blocks lost; recomputing the running sequences");
    }

    /// Takes the executed batch's results: chooses each finished row's token (all of them before
    /// anything changes, so a failed reduction fails the step with nothing committed), advances
    /// every sequence, commits its full blocks to the prefix cache, emits the tokens and retires
    /// the finished sequences.
    fn commit(
        &mut self,
        plan: &[Planned],
        at: &[usize],
        logits: StepLogits,
        stats: &mut StepStats,
    ) -> Result<(), ModelError> {
        let mut choices = Vec::with_capacity(plan.len());
        for (item, &index) in at.iter().enumerate() {
            choices.push(match logits.has(item) {
                true => {
                    let seq = &mut self.running[index];
                    let top_n = seq.request.sampling.logprobs.map(|n| n as usize);
                    Some(seq.sampler.choose(&logits, item, top_n)?)
                }
                false => None,
            });
        }
        drop(logits);

        stats.sequences = plan.len();
        for ((p, &index), choice) in plan.iter().zip(at).zip(choices) {
            let seq = &mut self.running[index];
            if seq.remaining() == 1 && seq.computed >= seq.prompt_len {
                stats.decode_tokens += 1;
            } else {
                stats.prefill_tokens += p.len;
            }
            seq.computed += p.len;
            Self::commit_blocks(&mut self.pool, seq, self.cfg.block_tokens.as_usize());
            if let Some(choice) = choice {
                self.emit(index, choice);
            }
        }
        self.retire_finished();
        Ok(())
    }

    /// Where running sequence `id` is (it is there: the plan names only running sequences).
    fn position(&self, id: u64) -> usize {
        self.running
            .iter()
            .position(|s| s.id == id)
            .expect("a planned sequence is running")
    }

    /// Makes sure running sequence `index` has blocks for `upto` tokens, preempting later
    /// sequences (or itself) when the pool is exhausted. Returns the sequence's index afterwards,
    /// or `None` if it was preempted itself.
    fn ensure_blocks(
        &mut self,
        index: usize,
        upto: usize,
        plan: &mut Vec<Planned>,
        budget: &mut usize,
        stats: &mut StepStats,
    ) -> Option<usize> {
        let bt = self.cfg.block_tokens.as_usize();
        loop {
            let missing = upto
                .div_ceil(bt)
                .saturating_sub(self.running[index].blocks.len());
            if missing == 0 {
                return Some(index);
            }
            if let Ok(blocks) = self.allocate(missing) {
                self.running[index].blocks.extend(blocks);
                return Some(index);
            }
            // Preempt the most recently admitted sequence; when that is this one, this one.
            let victim = self.running.len() - 1;
            let id = self.running[victim].id;
            if let Some(pos) = plan.iter().position(|p| p.id == id) {
                *budget += plan.remove(pos).len;
            }
            self.preempt(victim);
            stats.preempted += 1;
            if victim == index {
                return None;
            }
        }
    }

    /// Allocates what a prefill chunk of up to `budget` tokens needs, shrinking the chunk to the
    /// blocks available. Returns the chunk length.
    fn grow_for_prefill(&mut self, index: usize, budget: usize) -> usize {
        let bt = self.cfg.block_tokens.as_usize();
        let seq = &self.running[index];
        let want = seq.remaining().min(budget);
        let have = seq.blocks.len() * bt;
        let room = have.saturating_sub(seq.computed) + self.pool.available() * bt;
        let len = want.min(room);
        let missing = (seq.computed + len)
            .div_ceil(bt)
            .saturating_sub(seq.blocks.len());
        match self.allocate(missing) {
            Ok(blocks) => {
                self.running[index].blocks.extend(blocks);
                len
            }
            Err(_) => 0,
        }
    }

    /// Allocates `n` blocks from the pool; the cached blocks it evicts for them go to the lower
    /// tiers, copied out before anything writes them.
    fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, OutOfBlocks> {
        let blocks = self.pool.allocate(n)?;
        for (block, hash) in self.pool.take_evicted() {
            let exec = &self.exec;
            self.tiers.demote(hash, |out| exec.export_block(block, out));
        }
        Ok(blocks)
    }

    /// Writes every block of the prefix cache through to the disk tier (shutdown: a worker
    /// restarted on the same volume finds them again), most recently used last. Returns how
    /// many blocks the disk tier holds of them.
    pub fn persist(&mut self) -> usize {
        let blocks = self.pool.cached_blocks();
        let exec = &self.exec;
        blocks
            .into_iter()
            .filter(|&(block, hash)| {
                self.tiers
                    .persist(hash, |out| exec.export_block(block, out))
            })
            .count()
    }

    /// Drops staged blocks no waiting request wants (their requests were cancelled).
    fn prune_staged(&mut self) {
        let wanted: std::collections::HashSet<BlockHash> = self
            .waiting
            .iter()
            .flat_map(|seq| seq.chain.hashes().iter().copied())
            .collect();
        self.tiers.prune(|h| wanted.contains(h));
    }

    /// Admits the first waiting sequence (of the first [`ADMIT_SCAN`]) not waiting on a lower
    /// tier or on blocks a running sequence is computing, if its first chunk fits; returns that
    /// chunk's length. Its prefix is reused from the
    /// prefix cache, then from blocks staged from the lower tiers (copied into fresh blocks and
    /// committed); only the rest is computed.
    fn admit(&mut self, budget: usize) -> Option<usize> {
        let bt = self.cfg.block_tokens.as_usize();
        let (index, device, staged) =
            self.waiting
                .iter()
                .take(ADMIT_SCAN)
                .enumerate()
                .find_map(|(i, seq)| {
                    let reusable = reusable(&seq.chain, seq.tokens.len(), bt);
                    let device = self.pool.cached_prefix(reusable);
                    // A running sequence is computing blocks it could reuse: it waits for
                    // them rather than computing them twice (the answers of a request for
                    // several, requests on one document at once).
                    let computing = |r: &Sequence| shared_prefix(r.chain.hashes(), reusable);
                    if self.running.iter().any(|r| computing(r) > device) {
                        return None;
                    }
                    let fetch = self.tiers.fetch(&reusable[device..]);
                    (!fetch.pending).then_some((i, device, fetch.ready))
                })?;
        let seq = &self.waiting[index];
        let tokens = seq.tokens.len();
        let hashes: Vec<BlockHash> = reusable(&seq.chain, tokens, bt)[..device + staged].to_vec();
        let cached = self.pool.acquire_prefix(&hashes[..device]);
        let len = (tokens - (device + staged) * bt).min(budget);
        let missing = ((device + staged) * bt + len).div_ceil(bt) - device;
        let fresh = match self.allocate(missing) {
            Ok(fresh) => fresh,
            Err(_) => {
                self.pool.release(&cached);
                return None;
            }
        };
        let loaded = self.import_staged(&hashes[device..], &fresh[..staged]);
        if loaded > 0 {
            let parent = device.checked_sub(1).map(|i| hashes[i]);
            self.pool
                .commit(parent, &fresh[..loaded], &hashes[device..device + loaded]);
        }
        let computed = (device + loaded) * bt;
        let mut seq = self.waiting.remove(index)?;
        seq.committed = device + loaded;
        seq.computed = computed;
        seq.cached_tokens
            .get_or_insert(computed.min(seq.prompt_len));
        seq.blocks = cached;
        seq.blocks.extend(fresh);
        self.running.push(seq);
        Some((tokens - computed).min(budget))
    }

    /// Copies staged lower-tier blocks into `blocks`, in order, stopping at the first that is
    /// no longer staged or does not fit the store; returns how many were copied.
    fn import_staged(&mut self, hashes: &[BlockHash], blocks: &[BlockId]) -> usize {
        for (i, (hash, &block)) in hashes.iter().zip(blocks).enumerate() {
            let Some((bytes, source, io_secs)) = self.tiers.take_staged(hash) else {
                return i;
            };
            let (result, secs) = tier::timed(|| self.exec.import_block(block, &bytes));
            if let Err(error) = result {
                tracing::warn!(%hash, %error, "cannot load a KV block from a lower tier; recomputing it");
                return i;
            }
            self.tiers.imported(source, io_secs + secs);
        }
        hashes.len().min(blocks.len())
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        seq.committed = 0;
        tracing::debug!(
            tokens = seq.tokens.len(),
            "preempted a sequence (recompute)"
        );
        self.waiting.push_front(seq);
    }

    /// Puts every newly full, computed block of `seq` into the prefix cache.
    fn commit_blocks(pool: &mut BlockPool, seq: &mut Sequence, bt: usize) {
        let full = (seq.computed / bt).min(seq.chain.hashes().len());
        if full <= seq.committed {
            return;
        }
        let hashes = seq.chain.hashes();
        let parent = seq.committed.checked_sub(1).map(|i| hashes[i]);
        pool.commit(
            parent,
            &seq.blocks[seq.committed..full],
            &hashes[seq.committed..full],
        );
        seq.committed = full;
    }

    /// Samples the next token of running sequence `index` and sends it.
    fn emit(&mut self, index: usize, choice: Choice) {
        let seq = &mut self.running[index];
        let sampled = choice.sampled;
        let mut tally = seq.group.and_then(|id| self.groups.get_mut(&id));
        if seq.completion == 0 && tally.as_ref().is_none_or(|t| !t.prefilled) {
            let cached_tokens = seq.cached_tokens.unwrap_or(0) as u32;
            if let Some(t) = tally.as_deref_mut() {
                (t.prefilled, t.cached) = (true, cached_tokens);
            }
            let _ = seq.out.send(GenerateEvent::Prefilled {
                prompt_tokens: seq.prompt_len as u32,
                cached_tokens,
            });
        }
        seq.completion += 1;
        let params = &seq.request.sampling;
        let is_stop = params.stop_token_ids.contains(&sampled.token)
            || (!params.ignore_eos && self.cfg.eos_token_ids.contains(&sampled.token));
        if !is_stop {
            let _ = seq.out.send(GenerateEvent::Tokens {
                ids: vec![sampled.token],
                logprobs: params.logprobs.map(|_| vec![sampled.logprob]),
                top_logprobs: choice.top.map(|top| vec![top]),
                choice: seq.choice,
            });
            seq.tokens.push(sampled.token);
            seq.chain.extend(&[sampled.token]);
        }
        let capacity = self.pool.stats().total * self.cfg.block_tokens.as_usize();
        let context = self.cfg.max_context.min(capacity);
        let reason = if is_stop {
            Some(FinishReason::Stop)
        } else if seq.completion >= params.max_tokens || seq.tokens.len() >= context {
            Some(FinishReason::Length)
        } else {
            None
        };
        let Some(reason) = reason else { return };
        seq.done = true;
        let Some(tally) = tally else {
            let _ = seq.out.send(GenerateEvent::Finished {
                reason,
                usage: usage(seq),
            });
            return;
        };
        let _ = seq.out.send(GenerateEvent::Ended {
            choice: seq.choice,
            reason,
            completion_tokens: seq.completion,
        });
        tally.open -= 1;
        tally.completion += seq.completion;
        if tally.open == 0 {
            let usage = Usage {
                prompt_tokens: seq.prompt_len as u32,
                cached_tokens: tally.cached,
                completion_tokens: tally.completion,
            };
            let _ = seq.out.send(GenerateEvent::Finished { reason, usage });
            if let Some(id) = seq.group {
                self.groups.remove(&id);
            }
        }
    }

    fn retire_finished(&mut self) {
        let pool = &mut self.pool;
        let groups = &mut self.groups;
        self.running.retain(|seq| {
            if seq.done || seq.out.is_closed() {
                pool.release(&seq.blocks);
                if let Some(id) = seq.group.filter(|_| seq.out.is_closed()) {
                    groups.remove(&id);
                }
                false
            } else {
                true
            }
        });
    }

    /// Ends every request with an internal error and frees its blocks.
    pub fn fail_all(&mut self, message: &str) {
        self.groups.clear();
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.pool.release(&seq.blocks);
            let _ = seq.out.send(GenerateEvent::Error {
                code: ErrorCode::Internal,
                message: message.to_owned(),
            });
        }
    }

    /// Drops sequences whose caller went away.
    fn reap_cancelled(&mut self) {
        self.retire_finished();
        let before = self.waiting.len();
        let groups = &mut self.groups;
        self.waiting.retain(|seq| {
            if let Some(id) = seq.group.filter(|_| seq.out.is_closed()) {
                groups.remove(&id);
            }
            !seq.out.is_closed()
        });
        if self.waiting.len() < before && self.tiers.staged_len() > STAGED_PRUNE {
            // What the cancelled requests had staged is wanted by nobody now.
            self.prune_staged();
        }
    }
}

/// The leading block hashes of a `tokens`-token sequence that may come from a cache: all full
/// blocks but the one holding the last token, whose logits are needed (and whose block must be
/// private to be written).
/// Leading blocks two chains share. Hashes are chained (a block's hash covers every block
/// before it), so the shared blocks are a prefix and equal hashes at `k` mean equal before it.
fn shared_prefix(a: &[BlockHash], b: &[BlockHash]) -> usize {
    let (mut lo, mut hi) = (0, a.len().min(b.len()));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match a[mid] == b[mid] {
            true => lo = mid + 1,
            false => hi = mid,
        }
    }
    lo
}

fn reusable(chain: &HashChain, tokens: usize, bt: usize) -> &[BlockHash] {
    let hashes = chain.hashes();
    &hashes[..hashes.len().min((tokens - 1) / bt)]
}

fn usage(seq: &Sequence) -> Usage {
    Usage {
        prompt_tokens: seq.prompt_len as u32,
        cached_tokens: seq.cached_tokens.unwrap_or(0) as u32,
        completion_tokens: seq.completion,
    }
}

#[cfg(test)]
mod tests {
    use tidelock_protocol::{BlockTokens, Epoch, ModelName};
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;
    use crate::engine::sim::{SimExecutor, Timing};
    use crate::testing::greedy;

    fn engine() -> Engine<SimExecutor> {
        let cfg = EngineConfig {
            model: ModelName::new("sim").unwrap(),
            block_tokens: BlockTokens::new(64).unwrap(),
            max_step_tokens: 256,
            max_running: 8,
            max_waiting: 16,
            max_context: 8192,
            vocab_size: 1000,
            eos_token_ids: vec![],
        };
        let pool = BlockPool::new(64, cfg.block_tokens, Epoch::new(1));
        Engine::new(cfg, pool, SimExecutor::new(1000, Timing::INSTANT))
    }

    /// The load report's queue counts the prefill still to do: a waiting request whose prefix
    /// is cached adds only the rest, a cold one all of it, a running one what it has left.
    #[test]
    fn the_queue_counts_uncached_prefill_only() {
        let mut e = engine();
        let prompt: Vec<u32> = (100..740).collect(); // 640 tokens: 10 blocks of 64
        let (tx, mut rx) = unbounded_channel();
        e.submit(greedy(prompt.clone(), 1), tx);
        while !e.is_idle() {
            e.step().unwrap();
        }
        assert!(matches!(
            std::iter::from_fn(|| rx.try_recv().ok()).last(),
            Some(GenerateEvent::Finished { .. })
        ));
        assert_eq!(e.load().waiting_prefill_tokens, 0);

        // The same prompt and 64 more tokens: its first 10 blocks are cached, 64 tokens to
        // compute.
        let longer: Vec<u32> = (100..804).collect();
        let (tx, _warm) = unbounded_channel();
        e.submit(greedy(longer, 1), tx);
        assert_eq!(e.load().waiting_prefill_tokens, 64);
        let (tx, _cold) = unbounded_channel();
        e.submit(greedy((200..904).collect(), 1), tx);
        assert_eq!(e.load().waiting_prefill_tokens, 64 + 704);
        // One step (256 tokens of budget): the warm request's 64 are done, the cold one has
        // 704 - 192 left.
        e.step().unwrap();
        assert_eq!(e.load().waiting_prefill_tokens, 704 - 192);
        // A request behind the cold one, sharing its 11 blocks (704 tokens): they are computed by the
        // time it is admitted; 64 tokens of its own.
        let (tx, _behind) = unbounded_channel();
        e.submit(greedy((200..968).collect(), 1), tx);
        assert_eq!(e.load().waiting_prefill_tokens, 704 - 192 + 768 - 704);
    }
}
