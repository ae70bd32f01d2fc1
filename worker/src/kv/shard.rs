//! Where a forward pass keeps its new keys and values and computes attention: one worker's
//! store ([`Local`](crate::kv::backend::Local)), or a shard group's S stores ([`Coordinated`],
//! issue #7). Both are [`HostAttention`]s, so the model runs the same layers over either.
//!
//! **Who owns what.** The coordinator (shard 0, the worker the router pins) runs the engine, and
//! its block pool numbers every block of the group: group block `B` lives on shard `B % S`, at
//! place `B / S` of that shard's store ([`placement`]). Prefix caching, reference counts,
//! eviction and KV events are therefore the coordinator pool's, one index for the whole group,
//! exactly as for one worker; the shards ([`ShardServer`]) are stateless stores that append and
//! attend where they are told. A restarted shard has nothing to reconcile: the coordinator sees
//! its new incarnation in the next reply, drops its prefix cache and recomputes the running
//! sequences (the engine's preemption by recompute), and the shard serves again at once. A shard
//! that is down fails each step that needs it, with an error naming it, within its deadline.
//!
//! **Layout: striped by block.** The pool hands out free blocks in increasing order, so a
//! session's consecutive blocks land on consecutive shards: each shard holds `ceil(n / S)` or
//! `floor(n / S)` of a fresh session's `n` blocks, so each reads the same share of the context per
//! decode step (the step time is the slowest shard's), and new blocks rotate over the shards
//! rather than all landing on the last one as the session grows. After churn (blocks freed and
//! evicted in other orders) the placement is no longer exact rotation; `tests/sharded.rs` prints
//! the spread. Contiguous ranges per shard would need rebalancing as a session grows, and at any
//! length short of full the last range is the short one. Memory can never be short on one shard
//! while free on another: the pool's ids are exactly the union of the shards' places.
//!
//! Each shard computes attention over the blocks it holds ([`shard_attention`]): an output
//! normalised over those positions and its log-sum-exp, which the coordinator merges exactly
//! ([`merge_shards`]).

use tidelock_protocol::BlockId;
use tidelock_protocol::shard::{Append, AttendReply, AttendRequest, AttendSeq};

use crate::kv::KvStore;
use crate::kv::attention::{ShardPartial, ShardSeq, merge_shards, shard_attention};
use crate::kv::backend::HostAttention;

/// Why a shard's part of attention failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The shard restarted: every block it held is gone, so the coordinator's prefix cache must
    /// forget them.
    #[error("shard {shard}: restarted: the KV blocks it held are gone")]
    Lost { shard: usize },
    /// This call failed; what the shard holds is intact.
    #[error("shard {shard}: {fault}")]
    Failed {
        shard: usize,
        #[source]
        fault: ShardFault,
    },
}

impl ShardError {
    pub fn is_lost(&self) -> bool {
        matches!(self, ShardError::Lost { .. })
    }
}

/// Why one shard could not serve one request, on the shard or on the way to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardFault {
    /// The request does not fit this shard (its bounds, its shape, another model's): a
    /// misconfigured group or a hostile caller; the same request fails again anywhere.
    #[error("{0}")]
    Refused(String),
    /// The request or its reply could not be encoded or decoded.
    #[error("bad message: {0}")]
    Wire(String),
    /// The shard could not be reached or did not answer in time.
    #[error("{0}")]
    Link(String),
    /// The shard answered with an error status (a 400 is its `Refused`, across the network).
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    /// The reply does not answer the request (a shard of another build, a broken proxy).
    #[error("{0}")]
    Mismatch(String),
    /// `finish` without a `send` (a bug in the caller).
    #[error("no request was sent")]
    NoRequest,
}

/// Each batch row's sequence, for sequences of `rows` rows each, in order.
fn row_sequences(rows: impl Iterator<Item = usize>) -> Vec<usize> {
    rows.enumerate()
        .flat_map(|(i, n)| std::iter::repeat_n(i, n))
        .collect()
}

/// The shard holding group block `block`, in a group of `shards`, and its place in that shard's
/// store.
pub fn placement(block: BlockId, shards: usize) -> (usize, u32) {
    let b = block.get();
    let s = u32::try_from(shards).expect("a group of fewer than 2^32 shards");
    ((b % s) as usize, b / s)
}

/// Query heads per kv head a shard accepts (grouped-query attention uses up to 16 today).
const MAX_QUERY_GROUP: u32 = 128;
/// Query floats in one request at most (256 MiB): a prefill chunk of 512 rows of a model with
/// 64 heads of 128 is 4 Mi.
const MAX_QUERY_FLOATS: usize = 64 << 20;
/// Positions a shard accepts (2^40, far beyond any context).
const MAX_POSITION: u64 = 1 << 40;

/// One shard of a group as it serves the shard RPC ([`tidelock_protocol::shard`]): a KV store
/// with no bookkeeping of its own (the coordinator's pool decides what each place holds), and
/// the incarnation it reports so a coordinator can tell that it restarted.
#[derive(Debug)]
pub struct ShardServer {
    store: KvStore,
    incarnation: u64,
}

impl ShardServer {
    /// A shard serving `store`, with a fresh incarnation.
    pub fn new(store: KvStore) -> Self {
        ShardServer {
            store,
            incarnation: rand::random(),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Places in this shard's store.
    pub fn num_blocks(&self) -> usize {
        self.store.num_blocks()
    }

    /// Bytes of KV memory this shard holds (all layers, keys and values).
    pub fn kv_bytes(&self) -> usize {
        self.store.num_blocks() * self.store.shape().block_bytes()
    }

    fn check_place(&self, local: u32) -> Result<(), ShardFault> {
        match (local as usize) < self.store.num_blocks() {
            true => Ok(()),
            false => Err(ShardFault::Refused(format!(
                "block place {local} is outside this shard's {} (is every shard's --kv-cache the same?)",
                self.store.num_blocks()
            ))),
        }
    }

    /// The block import path: stores keys and values (`kv_heads * head_dim` floats per token,
    /// token after token) of `layer` for consecutive slots from `slot` of the block at `local`.
    /// Fills a context without computing it (the benchmark's 1M-token session; later, sessions
    /// moved between groups).
    pub fn import(
        &mut self,
        local: u32,
        layer: usize,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<(), ShardFault> {
        let shape = *self.store.shape();
        let width = shape.kv_heads * shape.head_dim;
        let n = keys.len() / width;
        self.check_place(local)?;
        if n == 0
            || keys.len() != values.len()
            || !keys.len().is_multiple_of(width)
            || slot + n > shape.block_tokens
            || layer >= shape.layers
        {
            return Err(ShardFault::Refused(format!(
                "an import of {n} tokens at slot {slot} of layer {layer} does not fit one block of {} slots",
                shape.block_tokens
            )));
        }
        let block = BlockId::new(local);
        for (i, (k, v)) in keys
            .chunks_exact(width)
            .zip(values.chunks_exact(width))
            .enumerate()
        {
            self.store.write(layer, &[block], slot + i, k, v);
        }
        Ok(())
    }

    /// One encoded request in, its encoded reply out (the HTTP route's work).
    pub fn serve(&mut self, body: &[u8]) -> Result<Vec<u8>, ShardFault> {
        let request = AttendRequest::decode(body).map_err(|e| ShardFault::Wire(e.to_string()))?;
        let reply = self.handle(&request)?;
        reply.encode().map_err(|e| ShardFault::Wire(e.to_string()))
    }

    /// Appends the request's keys and values, then computes attention over this shard's
    /// blocks of each sequence.
    pub fn handle(&mut self, req: &AttendRequest) -> Result<AttendReply, ShardFault> {
        let shape = *self.store.shape();
        let layer = req.layer as usize;
        if layer >= shape.layers {
            return Err(ShardFault::Refused(format!(
                "layer {layer} of {}",
                shape.layers
            )));
        }
        if (req.kv_heads as usize, req.head_dim as usize) != (shape.kv_heads, shape.head_dim) {
            return Err(ShardFault::Refused(format!(
                "{} kv heads of {}, but this shard holds {} of {} (another model?)",
                req.kv_heads, req.head_dim, shape.kv_heads, shape.head_dim
            )));
        }
        // Bounds that keep a hostile body from dividing by zero, overflowing positions or
        // multiplying its size in scratch memory (the attention's per-split partials).
        let group = req.heads / req.kv_heads;
        if group == 0 || group > MAX_QUERY_GROUP {
            return Err(ShardFault::Refused(format!(
                "{} query heads over {} kv heads (1 to {MAX_QUERY_GROUP} per kv head)",
                req.heads, req.kv_heads
            )));
        }
        if req.queries.len() > MAX_QUERY_FLOATS {
            return Err(ShardFault::Refused(format!(
                "{} query floats in one request, at most {MAX_QUERY_FLOATS}",
                req.queries.len()
            )));
        }
        if let Some(seq) = req
            .seqs
            .iter()
            .find(|s| s.start.saturating_add(u64::from(s.rows)) > MAX_POSITION)
        {
            return Err(ShardFault::Refused(format!(
                "a sequence at position {} is beyond {MAX_POSITION}",
                seq.start
            )));
        }
        if req.rows() == 0 {
            return Ok(AttendReply {
                incarnation: self.incarnation,
                rows: 0,
                heads: req.heads,
                head_dim: req.head_dim,
                outputs: Vec::new(),
                lse: Vec::new(),
            });
        }
        let mut logical = Vec::with_capacity(req.seqs.len());
        let mut places = Vec::with_capacity(req.seqs.len());
        for seq in &req.seqs {
            let (l, p): (Vec<u32>, Vec<BlockId>) = seq
                .blocks
                .iter()
                .map(|&(logical, local)| (logical, BlockId::new(local)))
                .unzip();
            for b in &p {
                self.check_place(b.get())?;
            }
            logical.push(l);
            places.push(p);
        }
        for a in &req.appends {
            self.check_place(a.local)?;
            if a.slot as usize >= shape.block_tokens {
                return Err(ShardFault::Refused(format!(
                    "slot {} of a {}-token block",
                    a.slot, shape.block_tokens
                )));
            }
            self.store.write(
                layer,
                &[BlockId::new(a.local)],
                a.slot as usize,
                &a.key,
                &a.value,
            );
        }
        let mut row = 0;
        let seqs: Vec<ShardSeq<'_>> = req
            .seqs
            .iter()
            .zip(logical.iter().zip(&places))
            .map(|(seq, (logical, table))| {
                let rows = row..row + seq.rows as usize;
                row = rows.end;
                ShardSeq {
                    rows,
                    start: seq.start as usize,
                    logical,
                    table,
                }
            })
            .collect();
        let part = shard_attention(
            self.store.layer(layer),
            &seqs,
            req.heads as usize,
            req.scale,
            &req.queries,
        );
        Ok(AttendReply {
            incarnation: self.incarnation,
            rows: row as u32,
            heads: req.heads,
            head_dim: req.head_dim,
            outputs: part.out,
            lse: part.lse,
        })
    }
}

/// How a coordinator reaches one shard: a request in, its reply out. Links over the network
/// encode them ([`tidelock_protocol::shard`]); the in-process one hands them over as they are.
///
/// A call is `send` then `finish`, so a coordinator sends every shard its request before it
/// waits for any reply: over the network the shards compute at the same time.
pub trait ShardLink: Send {
    /// Sends a request (a link over the network returns before the reply arrives).
    fn send(&mut self, request: &AttendRequest) -> Result<(), ShardFault>;

    /// The reply to the last request sent.
    fn finish(&mut self) -> Result<AttendReply, ShardFault>;

    /// Whether the shard computes in this process when the request is sent: such links are sent
    /// to last, so the remote shards compute meanwhile.
    fn in_process(&self) -> bool {
        false
    }

    /// One request and its reply.
    fn call(&mut self, request: &AttendRequest) -> Result<AttendReply, ShardFault> {
        self.send(request)?;
        self.finish()
    }
}

/// A shard in this process (the coordinator's own shard, and tests): no encoding, it computes
/// when the request is sent.
#[derive(Debug)]
pub struct InProcess {
    pub server: ShardServer,
    reply: Option<Result<AttendReply, ShardFault>>,
}

impl InProcess {
    pub fn new(server: ShardServer) -> Self {
        InProcess {
            server,
            reply: None,
        }
    }
}

impl ShardLink for InProcess {
    fn send(&mut self, request: &AttendRequest) -> Result<(), ShardFault> {
        self.reply = Some(self.server.handle(request));
        Ok(())
    }

    fn finish(&mut self) -> Result<AttendReply, ShardFault> {
        self.reply.take().unwrap_or(Err(ShardFault::NoRequest))
    }

    fn in_process(&self) -> bool {
        true
    }
}

/// A coordinator's links to the S shards of its group (index = shard), and the incarnation
/// each last answered with.
pub struct ShardGroup {
    links: Vec<Box<dyn ShardLink>>,
    incarnations: Vec<Option<u64>>,
}

impl std::fmt::Debug for ShardGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardGroup")
            .field("shards", &self.links.len())
            .field("incarnations", &self.incarnations)
            .finish_non_exhaustive()
    }
}

impl ShardGroup {
    pub fn new(links: Vec<Box<dyn ShardLink>>) -> Self {
        let incarnations = vec![None; links.len()];
        ShardGroup {
            links,
            incarnations,
        }
    }

    /// Shards in the group.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Reads a reply, checks it answers the request (`shape`: rows, heads, head dim) and that the
    /// shard is the one that holds its blocks: a new incarnation after a known one means it
    /// restarted, which loses the step and its blocks.
    fn accept(
        &mut self,
        shard: usize,
        reply: Result<AttendReply, ShardFault>,
        shape: (u32, u32, u32),
    ) -> Result<AttendReply, ShardError> {
        let failed = |fault: ShardFault| ShardError::Failed { shard, fault };
        let reply = reply.map_err(failed)?;
        if (reply.rows, reply.heads, reply.head_dim) != shape {
            return Err(failed(ShardFault::Mismatch(format!(
                "a reply of {} rows of {} heads of {}, for a request of {:?}",
                reply.rows, reply.heads, reply.head_dim, shape
            ))));
        }
        let known = self.incarnations[shard].replace(reply.incarnation);
        if known.is_some_and(|k| k != reply.incarnation) {
            return Err(ShardError::Lost { shard });
        }
        Ok(reply)
    }
}

/// One sequence of a coordinated forward call.
#[derive(Debug, Clone)]
pub struct CoordinatedSeq<'a> {
    pub start: usize,
    pub rows: std::ops::Range<usize>,
    /// The sequence's group blocks (the coordinator pool's ids), covering at least its rows.
    pub table: &'a [BlockId],
}

/// The coordinator's side of one forward call: new keys and values go to the shard holding
/// their block (sent with that shard's next attention request), every shard holding part of the
/// batch's context attends over its blocks, the replies merge exactly.
pub struct Coordinated<'a> {
    group: &'a mut ShardGroup,
    tables: Vec<&'a [BlockId]>,
    /// Per shard, the sequences as its requests name them (fixed for the call); empty when the
    /// shard holds none of the batch's context, and then it is not called.
    wire: Vec<Vec<AttendSeq>>,
    row_seq: Vec<usize>,
    block_tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    pending: Vec<Vec<Append>>,
}

impl std::fmt::Debug for Coordinated<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinated")
            .field("group", &self.group)
            .field("wire", &self.wire)
            .finish_non_exhaustive()
    }
}

impl<'a> Coordinated<'a> {
    pub fn new(
        group: &'a mut ShardGroup,
        seqs: &[CoordinatedSeq<'a>],
        block_tokens: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let shards = group.len();
        let row_seq = row_sequences(seqs.iter().map(|s| s.rows.len()));
        let mut wire: Vec<Vec<AttendSeq>> = (0..shards)
            .map(|_| {
                seqs.iter()
                    .map(|s| AttendSeq {
                        start: s.start as u64,
                        rows: s.rows.len() as u32,
                        blocks: Vec::new(),
                    })
                    .collect()
            })
            .collect();
        for (i, s) in seqs.iter().enumerate() {
            let used = (s.start + s.rows.len()).div_ceil(block_tokens);
            for (logical, &block) in s.table[..used.min(s.table.len())].iter().enumerate() {
                let (shard, local) = placement(block, shards);
                wire[shard][i].blocks.push((logical as u32, local));
            }
        }
        for w in &mut wire {
            if w.iter().all(|s| s.blocks.is_empty()) {
                w.clear();
            }
        }
        let pending = (0..shards).map(|_| Vec::new()).collect();
        Coordinated {
            group,
            tables: seqs.iter().map(|s| s.table).collect(),
            wire,
            row_seq,
            block_tokens,
            kv_heads,
            head_dim,
            pending,
        }
    }
}

impl HostAttention for Coordinated<'_> {
    fn write(&mut self, _layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        let block = self.tables[self.row_seq[row]][position / self.block_tokens];
        let (shard, local) = placement(block, self.group.len());
        self.pending[shard].push(Append {
            local,
            slot: (position % self.block_tokens) as u32,
            key: k.to_vec(),
            value: v.to_vec(),
        });
    }

    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ShardError> {
        // One request, its sequences and appends swapped per shard; every shard gets its
        // request before any reply is awaited, remote ones first so that they compute while an
        // in-process shard (the coordinator's own) does.
        let mut req = AttendRequest {
            layer: layer as u32,
            heads: heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            scale,
            seqs: Vec::new(),
            appends: Vec::new(),
            queries: q.to_vec(),
        };
        let mut called: Vec<usize> = (0..self.group.len())
            .filter(|&s| !self.wire[s].is_empty())
            .collect();
        called.sort_by_key(|&s| self.group.links[s].in_process());
        let mut failure: Option<ShardError> = None;
        let mut sent = Vec::with_capacity(called.len());
        for &s in &called {
            req.seqs = std::mem::take(&mut self.wire[s]);
            req.appends = std::mem::take(&mut self.pending[s]);
            let sent_one = self.group.links[s].send(&req);
            self.wire[s] = std::mem::take(&mut req.seqs);
            match sent_one {
                Ok(()) => sent.push(s),
                Err(fault) => {
                    failure = Some(ShardError::Failed { shard: s, fault });
                    break;
                }
            }
        }
        let shape = (
            self.row_seq.len() as u32,
            heads as u32,
            self.head_dim as u32,
        );
        let mut parts = Vec::with_capacity(called.len());
        for s in sent {
            // Collect every reply sent for, even after a failure, so no link is left mid-call.
            let reply = self.group.links[s].finish();
            match self.group.accept(s, reply, shape) {
                Ok(reply) => parts.push((
                    s,
                    ShardPartial {
                        out: reply.outputs,
                        lse: reply.lse,
                    },
                )),
                // A lost shard outranks a failed one: it is what the caller must act on.
                Err(e) if failure.as_ref().is_none_or(|f| e.is_lost() && !f.is_lost()) => {
                    failure = Some(e)
                }
                Err(_) => {}
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        // Merged in shard order whatever the order of the calls, so results do not depend on
        // which shard is local.
        parts.sort_by_key(|(s, _)| *s);
        let parts: Vec<ShardPartial> = parts.into_iter().map(|(_, p)| p).collect();
        merge_shards(&parts, self.head_dim, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvShape;

    const SHAPE: KvShape = KvShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 4,
        block_tokens: 4,
    };

    fn request(heads: u32, start: u64, rows: u32) -> AttendRequest {
        AttendRequest {
            layer: 1,
            heads,
            kv_heads: 2,
            head_dim: 4,
            scale: 0.5,
            seqs: vec![AttendSeq {
                start,
                rows,
                blocks: vec![(0, 1)],
            }],
            appends: vec![Append {
                local: 1,
                slot: 0,
                key: vec![0.5; 8],
                value: vec![1.0; 8],
            }],
            queries: vec![0.25; (rows * heads * 4) as usize],
        }
    }

    /// Requests a coordinator would never send, but a broken or hostile peer could: each is an
    /// error naming the problem, never a panic, and the shard serves the next good request.
    #[test]
    fn a_shard_refuses_impossible_requests_and_keeps_serving() {
        let mut shard = ShardServer::new(KvStore::new(SHAPE, 4));
        let mut zero_heads = request(2, 0, 1);
        zero_heads.heads = 0;
        zero_heads.queries.clear();
        let mut far_block = request(2, 0, 1);
        far_block.seqs[0].blocks = vec![(0, 4)];
        let mut far_append = request(2, 0, 1);
        far_append.appends[0].local = 9;
        let mut far_slot = request(2, 0, 1);
        far_slot.appends[0].slot = 4;
        let mut other_model = request(2, 0, 1);
        other_model.head_dim = 8;
        other_model.queries = vec![0.0; 16];
        for (req, why) in [
            (zero_heads, "0 query heads over 2 kv heads"),
            (request(2 * 129, 0, 1), "258 query heads over 2 kv heads"),
            (request(2, u64::MAX - 1, 1), "is beyond"),
            (far_block, "block place 4 is outside this shard's 4"),
            (far_append, "block place 9 is outside"),
            (far_slot, "slot 4 of a 4-token block"),
            (other_model, "(another model?)"),
        ] {
            let e = shard.handle(&req).unwrap_err();
            assert!(
                matches!(&e, ShardFault::Refused(m) if m.contains(why)),
                "{e} (wanted {why:?})"
            );
        }
        let empty = shard.handle(&request(2, 0, 0)).unwrap();
        assert_eq!((empty.rows, empty.outputs.len()), (0, 0));
        // The one position written: its value, whatever the score.
        let reply = shard.handle(&request(2, 0, 1)).unwrap();
        assert_eq!(reply.outputs, vec![1.0; 8]);
        assert_eq!(reply.incarnation, shard.incarnation());
    }

    /// A reply that does not answer the request (a shard of another build, a broken proxy) fails
    /// the call with a message, instead of the merge reading past its end.
    #[test]
    fn a_reply_of_the_wrong_shape_fails_the_call() {
        struct Short;
        impl ShardLink for Short {
            fn send(&mut self, _: &AttendRequest) -> Result<(), ShardFault> {
                Ok(())
            }
            fn finish(&mut self) -> Result<AttendReply, ShardFault> {
                Ok(AttendReply {
                    incarnation: 1,
                    rows: 0,
                    heads: 2,
                    head_dim: 4,
                    outputs: vec![],
                    lse: vec![],
                })
            }
        }
        let mut group = ShardGroup::new(vec![
            Box::new(InProcess::new(ShardServer::new(KvStore::new(SHAPE, 4)))),
            Box::new(Short),
        ]);
        let table = [BlockId::new(0), BlockId::new(1)];
        let seqs = [CoordinatedSeq {
            start: 4,
            rows: 0..1,
            table: &table,
        }];
        let mut c = Coordinated::new(&mut group, &seqs, 4, 2, 4);
        c.write(0, 0, 4, &[0.5; 8], &[1.0; 8]);
        let mut out = vec![0.0; 8];
        let e = c.attend(0, 2, 0.5, &[0.25; 8], &mut out).unwrap_err();
        let ShardError::Failed {
            shard: 1,
            fault: ShardFault::Mismatch(why),
        } = &e
        else {
            panic!("not shard 1's mismatch: {e:?}");
        };
        assert!(why.contains("a reply of 0 rows"), "{e}");
    }
}
