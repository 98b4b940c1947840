//! The persistence gate: a service's state is on disk before anything that depends on it leaves
//! the process, and the disk is written on a thread of its own, never on the control path's
//! async workers.
//!
//! A service's core (the IPAM allocator, the DNS record store) is a gossip channel registered in
//! the router core, wrapped in a [`Gated`]. After each round of inputs the actor calls
//! [`Gated::flush`]: when the core says its state changed, a snapshot is handed to the
//! [`Writer`] thread, and the round's outputs (gossip, donations, API answers) are *held* with
//! the sequence number of the save they depend on. They are released when that save (or a later
//! one) succeeded, and failed when it failed: answers then carry the save's error, gossip and
//! donations are dropped, and the save is retried a second later. Meanwhile the channel gives the
//! router core nothing of its state: [`GossipChannel::encode_full`] is empty and the deltas of
//! merges wait with the outputs. So after a crash no peer and no caller has seen anything the
//! disk does not hold, even while the disk fails.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info};
use weft_proto::{GossipChannel, PeerName};

use crate::host::identity::write_atomic;

/// How long after a failed save the next one is tried.
const RETRY: Duration = Duration::from_secs(1);
/// Merge deltas held at most while a save is pending; beyond that they are dropped (anti-entropy
/// carries the same state later).
const MAX_HELD_DELTAS: usize = 64;

/// Which state file a save is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileId {
    /// `ipam.json`.
    Ipam,
    /// `dns.json`.
    Dns,
}

/// What to do with a state file.
#[derive(Debug)]
pub enum SaveAction {
    /// Replace its content, crash-safely.
    Write(Vec<u8>),
    /// Remove it (a peer leaving the mesh's address range).
    Remove,
}

/// A finished save, reported back to the control path.
#[derive(Debug)]
pub struct SaveDone {
    /// The file.
    pub file: FileId,
    /// The save's sequence number.
    pub seq: u64,
    /// `Err` with the reason when the file could not be written.
    pub result: Result<(), String>,
}

/// Why an answer that waited for a save is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveError {
    /// The state file.
    pub file: String,
    /// What failed.
    pub message: String,
}

impl fmt::Display for SaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not save {}: {}; nothing was handed out and no peer was told. Free space or fix the state \
             directory, then ask again (the router retries the save every second)",
            self.file, self.message
        )
    }
}

struct Job {
    file: FileId,
    path: PathBuf,
    seq: u64,
    action: SaveAction,
}

/// The thread that writes state files. Jobs run in order; each reports a [`SaveDone`].
pub struct Writer {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the thread; finished saves arrive on `done`. It ends when the `Writer` is dropped
    /// or `done` is closed.
    pub fn spawn(done: mpsc::Sender<SaveDone>) -> Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("weft-persist".into())
            .spawn(move || {
                for job in rx {
                    let result = match &job.action {
                        SaveAction::Write(bytes) => write_atomic(&job.path, bytes),
                        SaveAction::Remove => remove_durably(&job.path),
                    }
                    .map_err(|e| format!("{e:#}"));
                    if done.blocking_send(SaveDone { file: job.file, seq: job.seq, result }).is_err() {
                        break;
                    }
                }
            })
            .context("starting the thread that saves state files")?;
        Ok(Writer { jobs: tx })
    }

    fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs.send(job).map_err(|_| "the thread that saves state files has stopped".to_string())
    }
}

/// Removes `path` (absent is fine) and syncs its directory, so the removal survives a crash.
fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {} after removing {}", dir.display(), path.display()))?;
    }
    Ok(())
}

/// Bookkeeping of one state file's saves: which state is on disk, which is on its way, and
/// whether the last save failed.
///
/// Sequence numbers name snapshots: `issued` is the last one handed to the writer, `durable` the
/// last one known on disk (everything up to it is). An output produced now depends on
/// [`SaveGate::needed`]: the next snapshot if the state changed since the last one, else the
/// last one.
#[derive(Debug)]
pub struct SaveGate {
    file: FileId,
    path: PathBuf,
    issued: u64,
    durable: u64,
    in_flight: bool,
    changed: bool,
    retry_at: Option<Instant>,
    failure: Option<String>,
    errors: u64,
    /// No new saves: the file is being removed.
    frozen: bool,
    /// The file was removed (the peer left): nothing is saved, everything goes out at once.
    left: bool,
}

impl SaveGate {
    /// A gate for `path`, whose current content matches the state (just loaded, or absent and
    /// the state empty).
    pub fn new(file: FileId, path: PathBuf) -> Self {
        SaveGate {
            file,
            path,
            issued: 0,
            durable: 0,
            in_flight: false,
            changed: false,
            retry_at: None,
            failure: None,
            errors: 0,
            frozen: false,
            left: false,
        }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last save's error, while no later save succeeded.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Saves that failed since the start.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Whether a save is being written.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    fn needed(&self, dirty: bool) -> u64 {
        if self.left {
            self.durable
        } else if self.changed || dirty {
            self.issued + 1
        } else {
            self.issued
        }
    }

    fn settled(&self, dirty: bool) -> bool {
        self.left || (!self.changed && !dirty && self.durable == self.issued)
    }

    fn due(&self, now: Instant) -> bool {
        self.changed && !self.in_flight && !self.frozen && self.retry_at.is_none_or(|t| now >= t)
    }

    fn start(&mut self, action: SaveAction, writer: &Writer) -> Result<u64, String> {
        let seq = self.issued + 1;
        writer.submit(Job { file: self.file, path: self.path.clone(), seq, action })?;
        self.issued = seq;
        self.in_flight = true;
        self.changed = false;
        Ok(seq)
    }

    fn finish(&mut self, seq: u64, result: &Result<(), String>, now: Instant) {
        self.in_flight = false;
        match result {
            Ok(()) => {
                self.durable = self.durable.max(seq);
                if self.failure.take().is_some() {
                    info!(file = %self.path.display(), "state saved again");
                }
                self.retry_at = None;
            }
            Err(e) => self.failed(e.clone(), now),
        }
    }

    fn failed(&mut self, message: String, now: Instant) {
        self.errors += 1;
        error!(file = %self.path.display(), error = %message, "could not save state; holding back everything that depends on it");
        self.failure = Some(message);
        // The state is still not on disk: save it again, a little later.
        self.changed = true;
        self.retry_at = Some(now + RETRY);
    }

    fn error(&self) -> SaveError {
        SaveError {
            file: self.path.display().to_string(),
            message: self.failure.clone().unwrap_or_else(|| "the save did not complete".into()),
        }
    }
}

/// An answer to an API caller that must wait for a save.
pub trait Answer: Send {
    /// Sends the answer, or the save's error.
    fn send(self: Box<Self>, saved: Result<(), SaveError>);
}

/// An answer with its value, sent once the state it reports is on disk (or the save's error, as
/// the caller's error type).
pub struct Deferred<T, E> {
    /// Where the answer goes.
    pub tx: oneshot::Sender<Result<T, E>>,
    /// The answer.
    pub value: T,
}

impl<T: Send, E: From<SaveError> + Send> Answer for Deferred<T, E> {
    fn send(self: Box<Self>, saved: Result<(), SaveError>) {
        let Deferred { tx, value } = *self;
        let _ = tx.send(saved.map(|()| value).map_err(E::from));
    }
}

/// Something waiting for a save.
pub enum Pending<O> {
    /// An output of the service's core (gossip, a donation, a request's result).
    Core(O),
    /// What a merge taught us, to pass on to the neighbours.
    Delta(Vec<u8>),
    /// An API answer.
    Answer(Box<dyn Answer>),
}

/// What a flush or a finished save lets go.
pub struct Released<O> {
    /// May leave now.
    pub ready: Vec<Pending<O>>,
    /// Depended on a save that failed: answers get `error`, gossip is dropped.
    pub failed: Vec<Pending<O>>,
    /// The failed save's error.
    pub error: Option<SaveError>,
}

impl<O> Released<O> {
    fn new() -> Self {
        Released { ready: Vec::new(), failed: Vec::new(), error: None }
    }
}

/// A core whose state is kept on disk (see the module docs).
pub trait Durable: GossipChannel {
    /// The core's outputs.
    type Output: Send + 'static;
    /// Whether the state changed since the last call (and clears the flag).
    fn take_dirty(&mut self) -> bool;
    /// Whether the state changed, without clearing the flag.
    fn is_dirty(&self) -> bool;
    /// The state to save.
    fn save_bytes(&self) -> Result<Vec<u8>, String>;
    /// The next output.
    fn poll_output(&mut self) -> Option<Self::Output>;
}

/// A [`Durable`] core with its save gate, registered in the router core as the core's channel.
pub struct Gated<C: Durable> {
    inner: C,
    gate: SaveGate,
    held: VecDeque<(u64, Pending<C::Output>)>,
    held_deltas: usize,
    dropped_deltas: u64,
}

impl<C: Durable> Gated<C> {
    /// Wraps a core whose state matches what `gate`'s file holds.
    pub fn new(inner: C, gate: SaveGate) -> Self {
        Gated { inner, gate, held: VecDeque::new(), held_deltas: 0, dropped_deltas: 0 }
    }

    /// The core, to read.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The core, to change; what it outputs is picked up by the next [`Gated::flush`].
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// The save bookkeeping.
    pub fn gate(&self) -> &SaveGate {
        &self.gate
    }

    /// Outputs and answers waiting for a save.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Merge deltas dropped because too many waited for a save.
    pub fn dropped_deltas(&self) -> u64 {
        self.dropped_deltas
    }

    /// Whether everything the core holds is on disk.
    pub fn settled(&self) -> bool {
        self.gate.settled(self.inner.is_dirty())
    }

    /// Holds an answer that reports the state as it is now.
    pub fn hold(&mut self, answer: Box<dyn Answer>) {
        let seq = self.gate.needed(self.inner.is_dirty());
        self.held.push_back((seq, Pending::Answer(answer)));
    }

    /// Ends a round of inputs: notes a change of state, takes the core's outputs, starts a save
    /// when one is due, and returns what may go now.
    pub fn flush(&mut self, now: Instant, writer: &Writer) -> Released<C::Output> {
        if self.inner.take_dirty() {
            self.gate.changed = true;
        }
        let seq = self.gate.needed(false);
        while let Some(o) = self.inner.poll_output() {
            self.held.push_back((seq, Pending::Core(o)));
        }
        let mut out = Released::new();
        if self.gate.due(now) {
            let started = self.inner.save_bytes().and_then(|b| self.gate.start(SaveAction::Write(b), writer));
            if let Err(e) = started {
                self.gate.failed(e, now);
                out = self.fail_upto(self.gate.issued + 1);
            }
        }
        self.release_into(&mut out);
        out
    }

    /// A save of this file finished.
    pub fn saved(&mut self, done: &SaveDone, now: Instant) -> Released<C::Output> {
        self.gate.finish(done.seq, &done.result, now);
        let mut out = match done.result {
            Ok(()) => Released::new(),
            Err(_) => self.fail_upto(done.seq),
        };
        self.release_into(&mut out);
        out
    }

    /// Stops saving and removes the file: the state is about to be forgotten (the peer leaves).
    /// Call it when no save is in flight ([`SaveGate::in_flight`]); the writer would run them in
    /// order anyway, but the removal must be the last thing that happens to the file.
    pub fn freeze_and_remove(&mut self, writer: &Writer) -> Result<u64, String> {
        self.gate.frozen = true;
        match self.gate.start(SaveAction::Remove, writer) {
            Ok(seq) => Ok(seq),
            Err(e) => {
                self.gate.frozen = false;
                Err(e)
            }
        }
    }

    /// The removal started by [`Gated::freeze_and_remove`] finished. On success everything held
    /// so far is failed with `why` (it depended on state that is now forgotten) and from now on
    /// outputs go out at once; on failure saving resumes and the error is returned.
    pub fn removed(&mut self, done: &SaveDone, why: &str) -> Result<Released<C::Output>, SaveError> {
        self.gate.in_flight = false;
        match &done.result {
            Ok(()) => {
                self.gate.durable = done.seq;
                self.gate.left = true;
                let mut out = Released::new();
                out.error = Some(SaveError { file: self.gate.path.display().to_string(), message: why.to_string() });
                out.failed = self.held.drain(..).map(|(_, p)| p).collect();
                self.held_deltas = 0;
                Ok(out)
            }
            Err(e) => {
                // The file still holds the state: write it again, which also releases what
                // waited on the removal.
                self.gate.frozen = false;
                self.gate.changed = true;
                Err(SaveError { file: self.gate.path.display().to_string(), message: e.clone() })
            }
        }
    }

    /// Undoes a removal whose hand-over could not happen: the state is still ours, so it is
    /// written again and saving goes on as before.
    pub fn resume_saving(&mut self) {
        self.gate.left = false;
        self.gate.frozen = false;
        self.gate.changed = true;
    }

    /// Holds a delta for the neighbours that reports the state as it is now (a local change
    /// the core returned rather than queued).
    pub fn hold_delta(&mut self, delta: Vec<u8>) {
        let seq = self.gate.needed(self.inner.is_dirty());
        self.held.push_back((seq, Pending::Delta(delta)));
        self.held_deltas += 1;
    }

    fn fail_upto(&mut self, seq: u64) -> Released<C::Output> {
        let mut out = Released::new();
        while self.held.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, p)) = self.held.pop_front() {
                if matches!(p, Pending::Delta(_)) {
                    self.held_deltas -= 1;
                }
                out.failed.push(p);
            }
        }
        out.error = Some(self.gate.error());
        out
    }

    fn release_into(&mut self, out: &mut Released<C::Output>) {
        let durable = if self.gate.left { u64::MAX } else { self.gate.durable };
        while self.held.front().is_some_and(|(s, _)| *s <= durable) {
            if let Some((_, p)) = self.held.pop_front() {
                if matches!(p, Pending::Delta(_)) {
                    self.held_deltas -= 1;
                }
                out.ready.push(p);
            }
        }
    }
}

impl<C: Durable> GossipChannel for Gated<C> {
    /// Nothing while the state is not on disk: a neighbour must not learn what a crash would
    /// take back. The router core sends nothing for an empty payload.
    fn encode_full(&self) -> Vec<u8> {
        if self.settled() {
            self.inner.encode_full()
        } else {
            Vec::new()
        }
    }

    fn merge(&mut self, from: PeerName, payload: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let delta = self.inner.merge(from, payload)?;
        match delta {
            Some(d) if !self.settled() => {
                if self.held_deltas < MAX_HELD_DELTAS {
                    let seq = self.gate.needed(self.inner.is_dirty());
                    self.held.push_back((seq, Pending::Delta(d)));
                    self.held_deltas += 1;
                } else {
                    self.dropped_deltas += 1;
                    debug!(%from, "merge delta dropped while a save is pending");
                }
                Ok(None)
            }
            other => Ok(other),
        }
    }

    fn handle_unicast(&mut self, from: PeerName, payload: &[u8]) -> Result<(), String> {
        self.inner.handle_unicast(from, payload)
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
