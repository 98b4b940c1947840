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
use weft_proto::{GossipChannel, Keys, PeerName};

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

    fn merge(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<Option<Vec<u8>>, String> {
        let delta = self.inner.merge(from, payload, keys)?;
        match delta {
            Some(d) if !self.settled() => {
                if self.held_deltas < MAX_HELD_DELTAS {
                    self.hold_delta(d);
                } else {
                    self.dropped_deltas += 1;
                    debug!(%from, "merge delta dropped while a save is pending");
                }
                Ok(None)
            }
            other => Ok(other),
        }
    }

    fn handle_unicast(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<(), String> {
        self.inner.handle_unicast(from, payload, keys)
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A core with one number as its state: `bump` changes it and queues an output carrying it;
    /// `merge` takes a bigger number from a neighbour and returns it as the delta to pass on.
    #[derive(Default)]
    struct Counter {
        n: u64,
        dirty: bool,
        out: VecDeque<u64>,
    }

    impl Counter {
        fn bump(&mut self) {
            self.n += 1;
            self.dirty = true;
            self.out.push_back(self.n);
        }
    }

    impl GossipChannel for Counter {
        fn encode_full(&self) -> Vec<u8> {
            self.n.to_be_bytes().to_vec()
        }
        fn merge(&mut self, _from: PeerName, payload: &[u8], _keys: &Keys) -> Result<Option<Vec<u8>>, String> {
            let n = u64::from_be_bytes(payload.try_into().map_err(|_| "bad".to_string())?);
            if n <= self.n {
                return Ok(None);
            }
            self.n = n;
            self.dirty = true;
            Ok(Some(payload.to_vec()))
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    impl Durable for Counter {
        type Output = u64;
        fn take_dirty(&mut self) -> bool {
            std::mem::take(&mut self.dirty)
        }
        fn is_dirty(&self) -> bool {
            self.dirty
        }
        fn save_bytes(&self) -> Result<Vec<u8>, String> {
            Ok(self.n.to_string().into_bytes())
        }
        fn poll_output(&mut self) -> Option<u64> {
            self.out.pop_front()
        }
    }

    struct Rig {
        dir: PathBuf,
        path: PathBuf,
        writer: Writer,
        done: mpsc::Receiver<SaveDone>,
        g: Gated<Counter>,
    }

    impl Rig {
        fn new(name: &str) -> Rig {
            let dir = std::env::temp_dir().join(format!("weft-persist-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("state.json");
            let (tx, done) = mpsc::channel(4);
            let writer = Writer::spawn(tx).unwrap();
            let g = Gated::new(Counter::default(), SaveGate::new(FileId::Ipam, path.clone()));
            Rig { dir, path, writer, done, g }
        }

        /// Waits for the save under way and hands it to the gate.
        fn finish(&mut self, now: Instant) -> (Released<u64>, Result<(), String>) {
            let d = self.done.blocking_recv().unwrap();
            let r = d.result.clone();
            (self.g.saved(&d, now), r)
        }

        fn on_disk(&self) -> Option<String> {
            std::fs::read_to_string(&self.path).ok()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn core_outputs(r: &Released<u64>) -> (Vec<u64>, Vec<u64>) {
        let pick = |v: &[Pending<u64>]| v.iter().filter_map(|p| if let Pending::Core(n) = p { Some(*n) } else { None }).collect();
        (pick(&r.ready), pick(&r.failed))
    }

    fn answer(g: &mut Gated<Counter>, value: &'static str) -> oneshot::Receiver<Result<&'static str, SaveError>> {
        let (tx, rx) = oneshot::channel();
        g.hold(Box::new(Deferred { tx, value }));
        rx
    }

    fn send_answers(r: Released<u64>) {
        for p in r.ready {
            if let Pending::Answer(a) = p {
                a.send(Ok(()));
            }
        }
        if let Some(e) = r.error {
            for p in r.failed {
                if let Pending::Answer(a) = p {
                    a.send(Err(e.clone()));
                }
            }
        }
    }

    #[test]
    fn outputs_wait_for_their_save() {
        let mut rig = Rig::new("wait");
        let now = Instant::now();
        rig.g.inner_mut().bump();
        let mut ans = answer(&mut rig.g, "bumped");
        let r = rig.g.flush(now, &rig.writer);
        assert!(r.ready.is_empty() && r.failed.is_empty(), "nothing goes before the save");
        assert!(rig.g.encode_full().is_empty(), "no full state while unsaved");
        // A delta learned meanwhile waits too.
        assert_eq!(rig.g.merge(PeerName::from_u64(2), &5u64.to_be_bytes(), &weft_proto::Keys::new(weft_proto::Trust::FirstUse)).unwrap(), None);
        let (r, res) = rig.finish(now);
        assert!(res.is_ok());
        assert_eq!(core_outputs(&r).0, vec![1]);
        // The merge made the state dirty again: its delta waits for the next save.
        assert!(!r.ready.iter().any(|p| matches!(p, Pending::Delta(_))));
        send_answers(r);
        assert_eq!(ans.try_recv().unwrap(), Ok("bumped"));
        let r = rig.g.flush(now, &rig.writer);
        assert!(r.ready.is_empty());
        let (r, _) = rig.finish(now);
        assert!(r.ready.iter().any(|p| matches!(p, Pending::Delta(d) if d == &5u64.to_be_bytes())));
        assert_eq!(rig.on_disk().as_deref(), Some("5"));
        assert!(rig.g.settled());
        assert_eq!(rig.g.encode_full(), 5u64.to_be_bytes().to_vec());
        // Settled: a delta passes straight through, a query answer goes at once.
        assert_eq!(rig.g.merge(PeerName::from_u64(2), &5u64.to_be_bytes(), &weft_proto::Keys::new(weft_proto::Trust::FirstUse)).unwrap(), None);
        let mut q = answer(&mut rig.g, "query");
        send_answers(rig.g.flush(now, &rig.writer));
        assert_eq!(q.try_recv().unwrap(), Ok("query"));
    }

    #[test]
    fn a_failed_save_fails_what_depends_on_it_and_is_retried() {
        let mut rig = Rig::new("fail");
        let now = Instant::now();
        // The directory goes away: the temporary file cannot be created.
        std::fs::remove_dir_all(&rig.dir).unwrap();
        rig.g.inner_mut().bump();
        let mut ans = answer(&mut rig.g, "bumped");
        let r = rig.g.flush(now, &rig.writer);
        assert!(r.ready.is_empty());
        let (r, res) = rig.finish(now);
        assert!(res.is_err());
        assert_eq!(core_outputs(&r), (vec![], vec![1]), "the gossip of a failed save is dropped");
        let err = r.error.clone().unwrap();
        assert!(err.message.contains("state.tmp"), "{err}");
        assert!(err.to_string().contains("nothing was handed out"), "{err}");
        send_answers(r);
        assert_eq!(ans.try_recv().unwrap(), Err(err));
        assert_eq!(rig.g.gate().errors(), 1);
        assert!(rig.g.gate().failure().is_some());
        assert!(rig.g.encode_full().is_empty(), "still unsaved: no full state");
        // More work while failing waits; the retry is not due yet.
        rig.g.inner_mut().bump();
        let r = rig.g.flush(now, &rig.writer);
        assert!(r.ready.is_empty() && r.failed.is_empty());
        assert!(!rig.g.gate().in_flight(), "no retry before a second has passed");
        // The disk is back: the retry saves everything, and what waited goes.
        std::fs::create_dir_all(&rig.dir).unwrap();
        let later = now + Duration::from_secs(2);
        rig.g.flush(later, &rig.writer);
        let (r, res) = rig.finish(later);
        assert!(res.is_ok());
        assert_eq!(core_outputs(&r).0, vec![2]);
        assert_eq!(rig.on_disk().as_deref(), Some("2"));
        assert!(rig.g.gate().failure().is_none());
        assert!(rig.g.settled());
    }

    #[test]
    fn removing_the_file_fails_what_waited_and_then_lets_everything_go() {
        let mut rig = Rig::new("remove");
        let now = Instant::now();
        rig.g.inner_mut().bump();
        rig.g.flush(now, &rig.writer);
        assert!(rig.finish(now).1.is_ok());
        assert_eq!(rig.on_disk().as_deref(), Some("1"));
        let seq = rig.g.freeze_and_remove(&rig.writer).unwrap();
        rig.g.inner_mut().bump();
        let mut ans = answer(&mut rig.g, "during");
        assert!(rig.g.flush(now, &rig.writer).ready.is_empty(), "nothing saved or sent while removing");
        let d = rig.done.blocking_recv().unwrap();
        assert_eq!(d.seq, seq);
        let r = rig.g.removed(&d, "left").unwrap();
        assert_eq!(core_outputs(&r).1, vec![2]);
        send_answers(r);
        assert!(ans.try_recv().unwrap().is_err());
        assert_eq!(rig.on_disk(), None);
        // Left: outputs go at once, nothing is written again.
        rig.g.inner_mut().bump();
        assert_eq!(core_outputs(&rig.g.flush(now, &rig.writer)).0, vec![3]);
        assert_eq!(rig.on_disk(), None);
    }
}
