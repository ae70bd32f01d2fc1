//! The disk tier: one file per block in a worker's own folder, written and read by its own
//! threads so the engine never waits on the disk.
//!
//! Files are `DIR/ab/abcdef....kvb` (the block hash in hex, fanned out over 256 folders), each a
//! one-block body of `tidelock_protocol::blocks` (layout, hash, payload, checksum). A file is
//! written under a temporary name and renamed, so a crash leaves either the whole file or none
//! under the real name; a torn or damaged file fails its checksum on load and is deleted and
//! counted. A folder is used by one worker at a time (`DIR/LOCK`, an advisory lock).
//!
//! The engine thread owns the index (which blocks are on disk, least recently used first, the
//! byte budget) and decides every eviction; threads only perform the queued work: a reader (a
//! request waits for its reads, so they never queue behind writes; the kernel is asked to read
//! the next queued files ahead), a checker (each block's checksum, while the reader reads the
//! next) and a writer (deletes, then writes, in order). A read of a block still queued for writing, or being written, is answered
//! from its bytes. On start the index is rebuilt from
//! the files present (oldest modification first), so a restarted worker finds its blocks again.

use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tidelock_protocol::BlockHash;
use tidelock_protocol::blocks::{
    self, BLOCK_HEAD_BYTES, BlockLayout, CHECKSUM_BYTES, PREFIX_BYTES,
};

use super::lru::Lru;

/// Why a disk tier cannot open its folder.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("KV disk tier {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("KV disk tier {dir} is in use by another worker (its LOCK file is held)")]
    Locked { dir: PathBuf },
    #[error("KV disk tier {dir}: {bytes} bytes hold no block of {file} bytes")]
    TooSmall { dir: PathBuf, bytes: u64, file: u64 },
}

/// What the I/O thread finished.
#[derive(Debug)]
pub enum Done {
    Read {
        hash: BlockHash,
        /// The payload, or why there is none.
        result: Result<Bytes, ReadFault>,
        /// Seconds the read and the checksum took.
        secs: f64,
    },
    WriteFailed {
        hash: BlockHash,
        error: String,
    },
}

/// A read that gave no payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFault {
    /// The file was gone or unreadable.
    Unreadable(String),
    /// The file's bytes failed their checksum or were not this block (deleted).
    Damaged(String),
}

#[derive(Debug, Default)]
struct Queue {
    reads: VecDeque<BlockHash>,
    writes: VecDeque<(BlockHash, Bytes)>,
    deletes: VecDeque<BlockHash>,
    write_bytes: u64,
    /// The write or delete the writer is working on (`flush` waits for it; a read of a block
    /// being written is answered from its bytes).
    writing: Option<(BlockHash, Option<Bytes>)>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Readers wait here for reads, the writer for writes and deletes (one condition each, so a
    /// wake-up never lands on a thread with nothing to do while the right one sleeps).
    wake_readers: Condvar,
    wake_writer: Condvar,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A worker's disk tier. See the module docs.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    layout: BlockLayout,
    capacity_blocks: usize,
    file_bytes: u64,
    lru: Lru,
    shared: Arc<Shared>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
    /// Bytes queued for writing at most; a demotion beyond it is dropped (the disk is slower
    /// than eviction), never queued without bound.
    max_queued_bytes: u64,
    _lock: File,
}

/// What opening found in the folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Opened {
    /// Blocks of this layout found and indexed.
    pub blocks: usize,
    /// Files removed: another layout, a wrong size or name, a leftover temporary file, or
    /// beyond the budget.
    pub removed: usize,
}

impl DiskTier {
    /// Opens (creating it if needed) `dir` for blocks of `layout`, holding at most `bytes`, and
    /// indexes the blocks already there.
    pub fn open(
        dir: &Path,
        bytes: u64,
        layout: BlockLayout,
    ) -> Result<(DiskTier, Opened), DiskError> {
        let io = |source| DiskError::Io {
            dir: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DiskError::Locked {
                    dir: dir.to_owned(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let file_bytes = layout.body_bytes(1);
        let capacity_blocks = usize::try_from(bytes / file_bytes).unwrap_or(usize::MAX);
        if capacity_blocks == 0 {
            return Err(DiskError::TooSmall {
                dir: dir.to_owned(),
                bytes,
                file: file_bytes,
            });
        }
        let (found, mut removed) = scan(dir, &layout, file_bytes).map_err(io)?;
        let mut lru = Lru::default();
        for (_, hash) in &found {
            lru.touch(*hash);
        }
        while lru.len() > capacity_blocks {
            if let Some(old) = lru.pop_oldest() {
                let _ = fs::remove_file(path_of(dir, &old));
                removed += 1;
            }
        }
        let shared = Arc::new(Shared::default());
        let (tx, done) = std::sync::mpsc::channel();
        // Reads on their own threads (one reads, one checks what was read): a waiting
        // request's block never queues behind writes.
        let (to_check, checks) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for _ in 0..READERS {
            threads.push(
                std::thread::Builder::new()
                    .name("kv-disk-read".into())
                    .spawn({
                        let (dir, shared, to_check) =
                            (dir.to_owned(), shared.clone(), to_check.clone());
                        move || read_loop(&dir, &layout, &shared, &to_check)
                    })
                    .map_err(io)?,
            );
        }
        drop(to_check);
        let checker = std::thread::Builder::new()
            .name("kv-disk-check".into())
            .spawn({
                let (dir, tx) = (dir.to_owned(), tx.clone());
                move || check_loop(&dir, &layout, &checks, &tx)
            })
            .map_err(io)?;
        let writer = std::thread::Builder::new()
            .name("kv-disk-write".into())
            .spawn({
                let (dir, shared) = (dir.to_owned(), shared.clone());
                move || write_loop(&dir, &layout, &shared, &tx)
            })
            .map_err(io)?;
        let opened = Opened {
            blocks: lru.len(),
            removed,
        };
        Ok((
            DiskTier {
                dir: dir.to_owned(),
                layout,
                capacity_blocks,
                file_bytes,
                lru,
                shared,
                done,
                threads: threads.into_iter().chain([checker, writer]).collect(),
                max_queued_bytes: (256 << 20).max(4 * file_bytes),
                _lock: lock,
            },
            opened,
        ))
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.lru.contains(hash)
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.len() == 0
    }

    pub fn capacity_blocks(&self) -> usize {
        self.capacity_blocks
    }

    /// Bytes of the files of the blocks indexed.
    pub fn used_bytes(&self) -> u64 {
        self.lru.len() as u64 * self.file_bytes
    }

    /// Marks a block recently used (it was wanted again).
    pub fn touch(&mut self, hash: &BlockHash) {
        if self.lru.contains(hash) {
            self.lru.touch(*hash);
        }
    }

    /// Queues a block for writing, deleting the least recently used blocks for room. Returns
    /// the blocks deleted, or `None` (nothing changed) when too many bytes already wait to be
    /// written and `wait` is false; with `wait`, waits for the queue to drain enough instead
    /// (shutdown, when nothing else runs).
    pub fn insert(
        &mut self,
        hash: BlockHash,
        payload: Bytes,
        wait: bool,
    ) -> Option<Vec<BlockHash>> {
        if self.lru.contains(&hash) {
            self.lru.touch(hash);
            return Some(Vec::new());
        }
        let mut q = self.shared.lock();
        while q.write_bytes > 0 && q.write_bytes + payload.len() as u64 > self.max_queued_bytes {
            if !wait {
                return None;
            }
            q = self.shared.idle.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let mut evicted = Vec::new();
        while self.lru.len() >= self.capacity_blocks {
            let Some(old) = self.lru.pop_oldest() else {
                break;
            };
            forget(&mut q, &old);
            evicted.push(old);
        }
        q.write_bytes += payload.len() as u64;
        q.writes.push_back((hash, payload));
        drop(q);
        self.shared.wake_writer.notify_one();
        self.lru.touch(hash);
        Some(evicted)
    }

    /// Queues a read; its [`Done::Read`] comes from [`DiskTier::try_done`] or
    /// [`DiskTier::wait_done`].
    pub fn read(&mut self, hash: BlockHash) {
        self.lru.touch(hash);
        self.shared.lock().reads.push_back(hash);
        self.shared.wake_readers.notify_one();
    }

    /// Drops a block from the index and deletes its file (after a failed read or write).
    pub fn remove(&mut self, hash: &BlockHash) -> bool {
        let known = self.lru.remove(hash);
        if known {
            forget(&mut self.shared.lock(), hash);
            self.shared.wake_writer.notify_one();
        }
        known
    }

    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    pub fn wait_done(&self, timeout: Duration) -> Option<Done> {
        self.done.recv_timeout(timeout).ok()
    }

    /// Waits until every queued write is on disk, at most `timeout`; whether it finished.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.lock();
        while !q.writes.is_empty() || !q.deletes.is_empty() || q.writing.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .shared
                .idle
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn hashes(&self) -> impl Iterator<Item = &BlockHash> {
        self.lru.iter()
    }

    /// A handle that reads this tier's files from another thread.
    pub fn reader(&self) -> DiskReader {
        DiskReader {
            dir: self.dir.clone(),
            layout: self.layout,
        }
    }
}

/// Reads a disk tier's blocks from any thread, checked (a peer's pull of blocks on disk). A
/// block deleted meanwhile is a miss.
#[derive(Debug, Clone)]
pub struct DiskReader {
    dir: PathBuf,
    layout: BlockLayout,
}

impl DiskReader {
    pub fn read(&self, hash: &BlockHash) -> Result<Bytes, ReadFault> {
        let raw = read_raw(&self.dir, &self.layout, hash)?;
        verify(&self.layout, hash, raw).map(Bytes::from)
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake_readers.notify_all();
        self.shared.wake_writer.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Cancels a queued write of `hash` or queues the deletion of its file.
fn forget(q: &mut Queue, hash: &BlockHash) {
    if let Some(i) = q.writes.iter().position(|(h, _)| h == hash) {
        if let Some((_, bytes)) = q.writes.remove(i) {
            q.write_bytes -= bytes.len() as u64;
        }
    } else {
        q.deletes.push_back(*hash);
    }
}

fn path_of(dir: &Path, hash: &BlockHash) -> PathBuf {
    let hex = hash.to_string();
    dir.join(&hex[..2]).join(format!("{hex}.kvb"))
}

/// Queued reads the kernel is asked to read ahead of the one in hand, so the device works
/// while the thread checks a block.
const READ_AHEAD: usize = 8;

/// Threads reading blocks at once: the device serves several requests in parallel.
const READERS: usize = 2;

/// The reader: reads queued blocks, first come first served, answering those still queued for
/// writing (or being written) from their bytes.
fn read_loop(
    dir: &Path,
    layout: &BlockLayout,
    shared: &Shared,
    checks: &Sender<(BlockHash, ReadOutcome, Instant)>,
) {
    let mut advised: std::collections::HashSet<BlockHash> = std::collections::HashSet::new();
    loop {
        let (hash, pending, ahead) = {
            let mut q = shared.lock();
            loop {
                if let Some(hash) = q.reads.pop_front() {
                    let ahead: Vec<BlockHash> = q
                        .reads
                        .iter()
                        .take(READ_AHEAD)
                        .filter(|h| !advised.contains(*h))
                        .copied()
                        .collect();
                    let writing = q
                        .writing
                        .as_ref()
                        .filter(|(h, _)| *h == hash)
                        .and_then(|(_, bytes)| bytes.clone());
                    let queued = q
                        .writes
                        .iter()
                        .find(|(h, _)| *h == hash)
                        .map(|(_, b)| b.clone());
                    break (hash, writing.or(queued), ahead);
                }
                if q.stop {
                    return;
                }
                q = shared
                    .wake_readers
                    .wait(q)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        for next in ahead {
            read_ahead(&path_of(dir, &next));
            advised.insert(next);
        }
        advised.remove(&hash);
        let started = Instant::now();
        let read = match pending {
            Some(bytes) => Ok(Err(bytes)),
            None => read_raw(dir, layout, &hash).map(Ok),
        };
        // A send fails only when the tier was dropped.
        let _ = checks.send((hash, read, started));
    }
}

/// What the reader hands the checker: a file's bytes to check, or bytes that need no check
/// (answered from the write queue), or the fault.
type ReadOutcome = Result<Result<Raw, Bytes>, ReadFault>;

/// The checker: checks each block the reader read while the reader reads the next, then reports
/// it (a damaged file is deleted).
fn check_loop(
    dir: &Path,
    layout: &BlockLayout,
    reads: &Receiver<(BlockHash, ReadOutcome, Instant)>,
    done: &Sender<Done>,
) {
    for (hash, read, started) in reads {
        let result = match read {
            Ok(Ok(raw)) => verify(layout, &hash, raw).map(Bytes::from),
            Ok(Err(bytes)) => Ok(bytes),
            Err(fault) => Err(fault),
        };
        if matches!(result, Err(ReadFault::Damaged(_))) {
            let _ = fs::remove_file(path_of(dir, &hash));
        }
        let _ = done.send(Done::Read {
            hash,
            result,
            secs: started.elapsed().as_secs_f64(),
        });
    }
}

/// The writer: deletes first (they make room), then writes, in order; finishes its queue
/// before it stops.
fn write_loop(dir: &Path, layout: &BlockLayout, shared: &Shared, done: &Sender<Done>) {
    loop {
        let (hash, bytes) = {
            let mut q = shared.lock();
            q.writing = None;
            // Room in the write queue (an `insert` may wait for it), or idle (`flush`).
            shared.idle.notify_all();
            loop {
                if let Some(hash) = q.deletes.pop_front() {
                    q.writing = Some((hash, None));
                    break (hash, None);
                }
                if let Some((hash, bytes)) = q.writes.pop_front() {
                    q.write_bytes -= bytes.len() as u64;
                    q.writing = Some((hash, Some(bytes.clone())));
                    break (hash, Some(bytes));
                }
                if q.stop {
                    return;
                }
                q = shared
                    .wake_writer
                    .wait(q)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        match bytes {
            Some(bytes) => {
                if let Err(e) = write_block(dir, layout, &hash, &bytes) {
                    let _ = done.send(Done::WriteFailed {
                        hash,
                        error: e.to_string(),
                    });
                }
            }
            None => {
                let _ = fs::remove_file(path_of(dir, &hash));
            }
        }
    }
}

fn write_block(
    dir: &Path,
    layout: &BlockLayout,
    hash: &BlockHash,
    payload: &[u8],
) -> io::Result<()> {
    let body = blocks::encode(layout, &[(*hash, payload)]).map_err(io::Error::other)?;
    let path = path_of(dir, hash);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &body)?;
    fs::rename(&tmp, &path)
}

/// Asks the kernel to start reading a file into the page cache (a hint: failures are ignored).
fn read_ahead(path: &Path) {
    if let Ok(file) = File::open(path) {
        use std::os::fd::AsFd;
        let _ = nix::fcntl::posix_fadvise(
            file.as_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }
}

/// A block's file as read, before its checksum is checked.
struct Raw {
    payload: Vec<u8>,
    sum: [u8; CHECKSUM_BYTES],
}

/// Reads one block's file: its head, then the payload straight into its buffer, then the
/// checksum ([`verify`] checks it, on another thread).
fn read_raw(dir: &Path, layout: &BlockLayout, hash: &BlockHash) -> Result<Raw, ReadFault> {
    let unreadable = |e: io::Error| ReadFault::Unreadable(e.to_string());
    let damaged = |e: io::Error| ReadFault::Damaged(e.to_string());
    let mut file = File::open(path_of(dir, hash)).map_err(unreadable)?;
    let mut head = [0u8; BLOCK_HEAD_BYTES];
    file.read_exact(&mut head).map_err(damaged)?;
    let (got, named, len) =
        blocks::block_head(&head).map_err(|e| ReadFault::Damaged(e.to_string()))?;
    if got != *layout {
        return Err(ReadFault::Damaged(format!(
            "written for another layout: {got:?}"
        )));
    }
    if named != *hash {
        return Err(ReadFault::Damaged("not the block named by the file".into()));
    }
    // Read into spare capacity: no zeroing of megabytes about to be overwritten.
    let mut payload = Vec::with_capacity(len as usize);
    (&mut file)
        .take(len)
        .read_to_end(&mut payload)
        .map_err(unreadable)?;
    if payload.len() as u64 != len {
        return Err(ReadFault::Damaged(
            "the file ends inside the payload".into(),
        ));
    }
    let mut sum = [0u8; CHECKSUM_BYTES + 1];
    if read_full(&mut file, &mut sum).map_err(unreadable)? != CHECKSUM_BYTES {
        return Err(ReadFault::Damaged("no checksum, or bytes after it".into()));
    }
    Ok(Raw {
        payload,
        sum: sum[..CHECKSUM_BYTES].try_into().expect("16 bytes"),
    })
}

/// The payload of a block read by [`read_raw`], if its checksum matches.
fn verify(layout: &BlockLayout, hash: &BlockHash, raw: Raw) -> Result<Vec<u8>, ReadFault> {
    match raw.sum == blocks::checksum(layout, hash, &raw.payload) {
        true => Ok(raw.payload),
        false => Err(ReadFault::Damaged("checksum mismatch".into())),
    }
}

/// Reads until `buf` is full or the file ends; how many bytes were read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The blocks of `layout` in `dir`, oldest modification first, and how many files were removed.
fn scan(
    dir: &Path,
    layout: &BlockLayout,
    file_bytes: u64,
) -> io::Result<(Vec<(std::time::SystemTime, BlockHash)>, usize)> {
    let mut found = Vec::new();
    let mut removed = 0;
    for fan in fs::read_dir(dir)? {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        for entry in fs::read_dir(fan.path())? {
            let entry = entry?;
            let path = entry.path();
            match indexed(&path, layout, file_bytes) {
                Some(found_block) => found.push(found_block),
                None => {
                    let _ = fs::remove_file(&path);
                    removed += 1;
                }
            }
        }
    }
    found.sort();
    Ok((found, removed))
}

/// A file's (modification time, hash) when it is a block of `layout` filed under its own hash.
fn indexed(
    path: &Path,
    layout: &BlockLayout,
    file_bytes: u64,
) -> Option<(std::time::SystemTime, BlockHash)> {
    if path.extension()? != "kvb" {
        return None;
    }
    let named: BlockHash = path.file_stem()?.to_str()?.parse().ok()?;
    let meta = fs::metadata(path).ok()?;
    if meta.len() != file_bytes {
        return None;
    }
    let mut prefix = [0u8; PREFIX_BYTES + 16];
    File::open(path).ok()?.read_exact(&mut prefix).ok()?;
    let (got, n, first) = blocks::peek(&prefix).ok()?;
    (got == *layout && n == 1 && first == Some(named)).then_some((meta.modified().ok()?, named))
}
