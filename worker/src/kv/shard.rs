//! Where a forward pass keeps its new keys and values and computes attention: one worker's
//! store ([`Local`]), or a session's blocks striped over the S workers of a shard group
//! ([`Striped`], issue #7). The model is written against [`Attention`] only, so both run the
//! same layers.
//!
//! Layout: **striped by block**. Logical block `b` of a sequence (positions `b * block_tokens ..`)
//! lives on shard `b % S`, at index `b / S` of that shard's table for the sequence. Why striping
//! rather than contiguous ranges: every shard holds `ceil(n / S)` or `floor(n / S)` of a
//! session's `n` blocks at every length, so each shard reads the same share of the context per
//! decode step (the step time is the slowest shard's), and new blocks rotate over the shards
//! rather than all landing on the last one as the session grows, so no shard fills first.
//! Contiguous ranges would need rebalancing as a session grows, and at any length short of full
//! the last range is the short one. A block is the unit either way, so prefix caching and block
//! events work per shard unchanged.
//!
//! Each shard computes attention over the blocks it holds ([`shard_attention`]): an output
//! normalised over those positions and its log-sum-exp, which the coordinator merges exactly
//! ([`merge_shards`]).

use std::collections::HashMap;

use tidelock_protocol::BlockId;
use tidelock_protocol::shard::{Append, AttendReply, AttendRequest, AttendSeq};

use crate::kv::KvStore;
use crate::kv::attention::{
    AttnSeq, ShardPartial, ShardSeq, merge_shards, paged_attention, shard_attention,
};

/// A forward pass's KV: writes the new tokens' keys and values, then attends.
pub trait Attention {
    /// Stores the key and value (`kv_heads * head_dim` floats each) of batch row `row`, at
    /// `position` of its sequence, for `layer`.
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]);

    /// Attention of every batch row over its sequence's context (written keys included) in
    /// `layer`: `q` and `out` are `[rows, heads * head_dim]`. Fails only when a remote shard
    /// does (the message says which and why).
    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), String>;
}

/// One worker's store: the sequences' block tables index it directly.
#[derive(Debug)]
pub struct Local<'a> {
    pub kv: &'a mut KvStore,
    pub seqs: Vec<AttnSeq<'a>>,
    /// Each batch row's block table.
    pub row_tables: Vec<&'a [BlockId]>,
}

impl Attention for Local<'_> {
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        self.kv.write(layer, self.row_tables[row], position, k, v);
    }

    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), String> {
        paged_attention(self.kv.layer(layer), &self.seqs, heads, scale, q, out);
        Ok(())
    }
}

/// Each batch row's sequence, for sequences of `rows` rows each, in order.
fn row_sequences(rows: impl Iterator<Item = usize>) -> Vec<usize> {
    rows.enumerate()
        .flat_map(|(i, n)| std::iter::repeat_n(i, n))
        .collect()
}

/// Shard and index within that shard's table of logical block `block`, with `shards` shards.
pub fn placement(block: usize, shards: usize) -> (usize, usize) {
    (block % shards, block / shards)
}

/// The logical blocks shard `shard` holds of a sequence of `blocks` blocks: `shard`,
/// `shard + S`, ...
pub fn logical_blocks(shard: usize, shards: usize, blocks: usize) -> Vec<u32> {
    (shard..blocks)
        .step_by(shards)
        .map(|b| u32::try_from(b).expect("block index fits u32"))
        .collect()
}

/// A sequence striped over the shards: per shard, the local ids of the blocks it holds, in
/// logical order (shard `s`'s `j`-th block is logical block `s + j * S`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StripedTables {
    pub shards: Vec<Vec<BlockId>>,
}

impl StripedTables {
    /// Blocks of the sequence, over every shard.
    pub fn blocks(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }
}

/// One sequence's rows in a striped forward call.
#[derive(Debug, Clone)]
pub struct StripedSeq<'a> {
    pub rows: std::ops::Range<usize>,
    pub start: usize,
    pub tables: &'a StripedTables,
}

/// The S shards of a group in one process: each shard is its own store (its own memory and block
/// ids), and attention runs per shard and merges, exactly as across workers. The coordinator's
/// logic without the network: the exactness tests compare it with [`Local`], and the RPC
/// transport replaces the direct calls.
#[derive(Debug)]
pub struct Striped<'a> {
    stores: &'a mut [KvStore],
    seqs: Vec<StripedSeq<'a>>,
    /// Each batch row's sequence.
    row_seq: Vec<usize>,
}

impl<'a> Striped<'a> {
    pub fn new(stores: &'a mut [KvStore], seqs: Vec<StripedSeq<'a>>) -> Self {
        let row_seq = row_sequences(seqs.iter().map(|s| s.rows.len()));
        Striped {
            stores,
            seqs,
            row_seq,
        }
    }

    fn shards(&self) -> usize {
        self.stores.len()
    }
}

impl Attention for Striped<'_> {
    fn write(&mut self, layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        let bt = self.stores[0].shape().block_tokens;
        let (shard, index) = placement(position / bt, self.shards());
        let tables = self.seqs[self.row_seq[row]].tables;
        let block = tables.shards[shard][index];
        // The store's write takes a table indexed by position / block_tokens: a one-entry
        // table and the position within the block.
        self.stores[shard].write(layer, &[block], position % bt, k, v);
    }

    fn attend(
        &mut self,
        layer: usize,
        heads: usize,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), String> {
        let d = self.stores[0].shape().head_dim;
        let shards = self.shards();
        let parts: Vec<ShardPartial> = self
            .stores
            .iter()
            .enumerate()
            .map(|(s, store)| {
                let logical: Vec<Vec<u32>> = self
                    .seqs
                    .iter()
                    .map(|seq| logical_blocks(s, shards, seq.tables.blocks()))
                    .collect();
                let seqs: Vec<ShardSeq<'_>> = self
                    .seqs
                    .iter()
                    .zip(&logical)
                    .map(|(seq, logical)| ShardSeq {
                        rows: seq.rows.clone(),
                        start: seq.start,
                        logical,
                        table: &seq.tables.shards[s],
                    })
                    .collect();
                shard_attention(store.layer(layer), &seqs, heads, scale, q)
            })
            .collect();
        merge_shards(&parts, d, out);
        Ok(())
    }
}

/// One shard of a group as it serves the shard RPC ([`tidelock_protocol::shard`]): its own
/// store, and per session (the coordinator's handle) the local blocks it holds, allocated as
/// the session grows.
#[derive(Debug)]
pub struct ShardServer {
    index: usize,
    shards: usize,
    store: KvStore,
    free: Vec<BlockId>,
    sessions: HashMap<u64, Vec<BlockId>>,
}

impl ShardServer {
    /// Shard `index` of `shards`, with `store`'s blocks all free.
    pub fn new(index: usize, shards: usize, store: KvStore) -> Self {
        let free = (0..store.num_blocks() as u32)
            .rev()
            .map(BlockId::new)
            .collect();
        ShardServer {
            index,
            shards,
            store,
            free,
            sessions: HashMap::new(),
        }
    }

    /// Extends `session`'s table to `len` blocks from the free ones.
    fn grow(&mut self, session: u64, len: usize) -> Result<(), String> {
        let table = self.sessions.entry(session).or_default();
        while table.len() < len {
            let block = self
                .free
                .pop()
                .ok_or_else(|| format!("shard {} is out of KV blocks", self.index))?;
            table.push(block);
        }
        Ok(())
    }

    /// Bytes of KV memory this shard holds (all layers, keys and values).
    pub fn kv_bytes(&self) -> usize {
        self.store.num_blocks() * self.store.shape().block_bytes()
    }

    /// The block import path: stores keys and values (`kv_heads * head_dim` floats per token,
    /// token after token) of `layer` for consecutive positions from `first`, all in one block
    /// this shard holds, allocating the session's blocks up to it. Fills a context without
    /// computing it (moving a session between groups, benchmarks).
    pub fn import(
        &mut self,
        session: u64,
        layer: usize,
        first: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<(), String> {
        let shape = *self.store.shape();
        let width = shape.kv_heads * shape.head_dim;
        let n = keys.len() / width;
        let bt = shape.block_tokens;
        if n == 0 || keys.len() != values.len() || first / bt != (first + n - 1) / bt {
            return Err(format!(
                "an import of {n} tokens from {first} is not within one block"
            ));
        }
        let (shard, index) = placement(first / bt, self.shards);
        if shard != self.index {
            return Err(format!(
                "block {} belongs to shard {shard}, not {}",
                first / bt,
                self.index
            ));
        }
        self.grow(session, index + 1)?;
        let block = self.sessions[&session][index];
        for (i, (k, v)) in keys
            .chunks_exact(width)
            .zip(values.chunks_exact(width))
            .enumerate()
        {
            self.store.write(layer, &[block], (first + i) % bt, k, v);
        }
        Ok(())
    }

    /// Appends the request's keys and values, then computes attention over this shard's
    /// blocks of each sequence.
    pub fn handle(&mut self, req: &AttendRequest) -> Result<AttendReply, String> {
        let bt = self.store.shape().block_tokens;
        let layer = req.layer as usize;
        if layer >= self.store.shape().layers {
            return Err(format!("layer {layer} of {}", self.store.shape().layers));
        }
        let mut logical = Vec::with_capacity(req.seqs.len());
        for seq in &req.seqs {
            let mine = logical_blocks(self.index, self.shards, seq.blocks as usize);
            self.grow(seq.session, mine.len())?;
            logical.push(mine);
        }
        for a in &req.appends {
            let seq = &req.seqs[a.seq as usize];
            let (shard, index) = placement(a.position as usize / bt, self.shards);
            if shard != self.index {
                return Err(format!(
                    "position {} belongs to shard {shard}, not {}",
                    a.position, self.index
                ));
            }
            let block = self.sessions[&seq.session][index];
            self.store
                .write(layer, &[block], a.position as usize % bt, &a.key, &a.value);
        }
        let mut row = 0;
        let seqs: Vec<ShardSeq<'_>> = req
            .seqs
            .iter()
            .zip(&logical)
            .map(|(seq, logical)| {
                let rows = row..row + seq.rows as usize;
                row = rows.end;
                ShardSeq {
                    rows,
                    start: seq.start as usize,
                    logical,
                    table: &self.sessions[&seq.session][..logical.len()],
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
            rows: row as u32,
            heads: req.heads,
            head_dim: req.head_dim,
            outputs: part.out,
            lse: part.lse,
        })
    }
}

/// How a coordinator reaches one shard: a request body in, a reply body out.
///
/// A call is `send` then `finish`, so a coordinator sends every shard its request before it
/// waits for any reply: over the network the shards compute at the same time.
pub trait ShardLink: Send {
    /// Sends a request body (a link over the network returns before the reply arrives).
    fn send(&mut self, body: Vec<u8>) -> Result<(), String>;

    /// The reply body to the last request sent.
    fn finish(&mut self) -> Result<Vec<u8>, String>;

    /// One request and its reply.
    fn call(&mut self, body: Vec<u8>) -> Result<Vec<u8>, String> {
        self.send(body)?;
        self.finish()
    }
}

/// A shard in this process, reached through the encoded bodies all the same (the local shard of
/// a group short-circuits the network this way). It computes when the request is sent.
#[derive(Debug)]
pub struct InProcess {
    pub server: ShardServer,
    reply: Option<Result<Vec<u8>, String>>,
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
    fn send(&mut self, body: Vec<u8>) -> Result<(), String> {
        let reply = AttendRequest::decode(&body)
            .map_err(|e| e.to_string())
            .and_then(|req| self.server.handle(&req))
            .and_then(|reply| reply.encode().map_err(|e| e.to_string()));
        self.reply = Some(reply);
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<u8>, String> {
        self.reply
            .take()
            .unwrap_or_else(|| Err("no request was sent".into()))
    }
}

/// One sequence of a coordinated forward call.
#[derive(Debug, Clone)]
pub struct CoordinatedSeq {
    /// The handle the shards keep the sequence's blocks under.
    pub session: u64,
    pub start: usize,
    pub rows: std::ops::Range<usize>,
}

/// The coordinator's side: new keys and values go to the shard holding their block (sent with
/// that shard's next attention request), every shard attends over its blocks, the replies
/// merge exactly.
pub struct Coordinated<'a> {
    links: &'a mut [Box<dyn ShardLink>],
    /// The sequences as every shard's request names them (fixed for the call).
    wire: Vec<AttendSeq>,
    row_seq: Vec<usize>,
    block_tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    pending: Vec<Vec<Append>>,
}

impl std::fmt::Debug for Coordinated<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinated")
            .field("shards", &self.links.len())
            .field("seqs", &self.wire)
            .finish_non_exhaustive()
    }
}

impl<'a> Coordinated<'a> {
    pub fn new(
        links: &'a mut [Box<dyn ShardLink>],
        seqs: Vec<CoordinatedSeq>,
        block_tokens: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let row_seq = row_sequences(seqs.iter().map(|s| s.rows.len()));
        let wire = seqs
            .iter()
            .map(|s| AttendSeq {
                session: s.session,
                start: s.start as u64,
                rows: s.rows.len() as u32,
                blocks: (s.start + s.rows.len()).div_ceil(block_tokens) as u32,
            })
            .collect();
        let pending = (0..links.len()).map(|_| Vec::new()).collect();
        Coordinated {
            links,
            wire,
            row_seq,
            block_tokens,
            kv_heads,
            head_dim,
            pending,
        }
    }
}

impl Attention for Coordinated<'_> {
    fn write(&mut self, _layer: usize, row: usize, position: usize, k: &[f32], v: &[f32]) {
        let (shard, _) = placement(position / self.block_tokens, self.links.len());
        self.pending[shard].push(Append {
            seq: self.row_seq[row] as u32,
            position: position as u64,
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
    ) -> Result<(), String> {
        // One request, its appends swapped per shard; every shard gets its request before any
        // reply is awaited.
        let mut req = AttendRequest {
            layer: layer as u32,
            heads: heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            scale,
            seqs: self.wire.clone(),
            appends: Vec::new(),
            queries: q.to_vec(),
        };
        for (s, link) in self.links.iter_mut().enumerate() {
            req.appends = std::mem::take(&mut self.pending[s]);
            let body = req.encode().map_err(|e| e.to_string())?;
            link.send(body).map_err(|e| format!("shard {s}: {e}"))?;
        }
        let mut parts = Vec::with_capacity(self.links.len());
        let mut failure = None;
        for (s, link) in self.links.iter_mut().enumerate() {
            // Collect every reply, even after a failure, so no link is left mid-call.
            let reply = link
                .finish()
                .and_then(|r| AttendReply::decode(&r).map_err(|e| e.to_string()));
            match reply {
                Ok(reply) => parts.push(ShardPartial {
                    out: reply.outputs,
                    lse: reply.lse,
                }),
                Err(e) => {
                    failure.get_or_insert(format!("shard {s}: {e}"));
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        merge_shards(&parts, self.head_dim, out);
        Ok(())
    }
}
