//! Per-connection data paths ("forwarders").
//!
//! Every control connection has an ordered list of candidate forwarders, most
//! preferred first. Each keeps probing its own path; the connection carries
//! frames on the first one whose probes say it works both ways, and falls back
//! down the list when it stops working, and back up when a better one works
//! again. The kernel VXLAN fastpath (`control::fastpath`) goes in front of
//! the sleeve where both ends allow it: it programs the kernel's forwarding
//! entries in `activate` and removes them in `deactivate`.

use std::sync::Arc;
use std::time::Duration;

use weft_proto::ControlMsg;

use super::links::Link;

/// Silence after which a sleeve path counts as broken.
pub const HEARTBEAT_DEAD: Duration = Duration::from_millis(3500);

/// What a forwarder's probes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Works both ways.
    Up,
    /// Does not (yet) work; says why, for `weft status`.
    Down(String),
}

/// One way of carrying a connection's frames. See the module docs.
pub trait Forwarder: Send {
    /// Short name shown in status ("sleeve", "fastpath").
    fn kind(&self) -> &'static str;
    /// Whether the path works both ways now.
    fn health(&self) -> Health;
    /// Called once a second: probe the path. Returns a report for the peer
    /// when our view of its probes changed.
    fn tick(&mut self) -> Option<ControlMsg>;
    /// A report from the peer about our probes. Returns whether it was for this forwarder.
    fn handle_report(&mut self, msg: &ControlMsg) -> bool;
    /// Start carrying the peer's frames on this path.
    fn activate(&mut self);
    /// Stop carrying them (another path took over, or this one broke).
    fn deactivate(&mut self);
}

/// The sleeve: frames in encrypted UDP through the router's TAP threads.
///
/// Probes are the sleeve heartbeats the TAP thread sends on every link; the
/// peer tells us over the control connection whether it hears ours.
pub struct SleeveForwarder {
    link: Arc<Link>,
    port: u16,
    hear_peer: bool,
    peer_hears_us: bool,
}

impl SleeveForwarder {
    /// The sleeve path of `link`; `port` is our sleeve port (for messages).
    pub fn new(link: Arc<Link>, port: u16) -> Self {
        SleeveForwarder { link, port, hear_peer: false, peer_hears_us: false }
    }
}

impl Forwarder for SleeveForwarder {
    fn kind(&self) -> &'static str {
        "sleeve"
    }

    fn health(&self) -> Health {
        match (self.hear_peer, self.peer_hears_us) {
            (true, true) => Health::Up,
            (false, false) => Health::Down(format!("no sleeve heartbeats either way on UDP {}", self.port)),
            (false, true) => Health::Down(format!("UDP path broken: we hear nothing from the peer on UDP {}", self.port)),
            (true, false) => Health::Down("UDP path broken: the peer hears nothing from us".into()),
        }
    }

    fn tick(&mut self) -> Option<ControlMsg> {
        // The heartbeats themselves go out from the TAP thread, for all links at once.
        let hear = self.link.heartbeat_age().is_some_and(|a| a < HEARTBEAT_DEAD);
        if hear == self.hear_peer {
            return None;
        }
        self.hear_peer = hear;
        if !hear {
            tracing::warn!(peer = %self.link.peer, "no sleeve heartbeats for {:?}: UDP path broken", HEARTBEAT_DEAD);
        }
        Some(ControlMsg::SleeveState { receiving: hear })
    }

    fn handle_report(&mut self, msg: &ControlMsg) -> bool {
        match msg {
            ControlMsg::SleeveState { receiving } => {
                self.peer_hears_us = *receiving;
                true
            }
            _ => false,
        }
    }

    // The sleeve link exists from connection up to down; the TAP thread uses
    // it whenever routes point at this peer. Nothing to switch.
    fn activate(&mut self) {}
    fn deactivate(&mut self) {}
}

/// A connection's forwarders and the one in use.
pub struct Paths {
    forwarders: Vec<Box<dyn Forwarder>>,
    active: Option<usize>,
    ever_up: bool,
    /// Why a preferred path is not among the candidates (e.g. no fastpath towards this peer).
    note: Option<String>,
}

impl Paths {
    /// Candidates in order of preference.
    pub fn new(forwarders: Vec<Box<dyn Forwarder>>) -> Self {
        Paths { forwarders, active: None, ever_up: false, note: None }
    }

    /// Says why a preferred path is missing from the candidates; shown while a lesser one works.
    pub fn with_note(mut self, note: String) -> Self {
        self.note = Some(note);
        self
    }

    /// Probes every path and switches to the best one that works. Returns
    /// reports for the peer, and whether the choice changed.
    pub fn tick(&mut self) -> (Vec<ControlMsg>, bool) {
        let reports = self.forwarders.iter_mut().filter_map(|f| f.tick()).collect();
        (reports, self.choose())
    }

    /// Hands a peer's report to the forwarder it is for; re-chooses. Returns whether the choice changed.
    pub fn handle_report(&mut self, msg: &ControlMsg) -> bool {
        let mut used = false;
        for f in &mut self.forwarders {
            used |= f.handle_report(msg);
        }
        used && self.choose()
    }

    fn choose(&mut self) -> bool {
        let best = self.forwarders.iter().position(|f| f.health() == Health::Up);
        if best == self.active {
            return false;
        }
        if let Some(old) = self.active.and_then(|i| self.forwarders.get_mut(i)) {
            old.deactivate();
        }
        if let Some(new) = best.and_then(|i| self.forwarders.get_mut(i)) {
            new.activate();
            self.ever_up = true;
        }
        self.active = best;
        true
    }

    /// The forwarder in use, if any works.
    pub fn active(&self) -> Option<&'static str> {
        self.active.and_then(|i| self.forwarders.get(i)).map(|f| f.kind())
    }

    /// State and explanation for status: established on the active path, or
    /// pending with the best candidate's reason.
    pub fn describe(&self) -> (&'static str, String) {
        match self.active.and_then(|i| self.forwarders.get(i).map(|f| (i, f))) {
            Some((i, f)) => {
                // Why not a better one: the first preferred candidate's reason, or the note.
                let better = self.forwarders[..i].iter().find_map(|b| match b.health() {
                    Health::Up => None,
                    Health::Down(r) => Some(r),
                });
                match better.or_else(|| self.note.clone()) {
                    Some(why) => ("established", format!("{}: {why}", f.kind())),
                    None => ("established", f.kind().to_string()),
                }
            }
            None => {
                let why = self.forwarders.first().map(|f| match f.health() {
                    Health::Up => String::new(),
                    Health::Down(r) => r,
                });
                let why = why.unwrap_or_else(|| "no forwarder".into());
                ("pending", if self.ever_up { why } else { format!("waiting: {why}") })
            }
        }
    }

    /// Every candidate with its health, for `weft status --json`.
    pub fn report(&self) -> Vec<(&'static str, Health)> {
        self.forwarders.iter().map(|f| (f.kind(), f.health())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forwarder whose health the test sets.
    struct Fake {
        kind: &'static str,
        up: bool,
        active: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Forwarder for Fake {
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn health(&self) -> Health {
            if self.up { Health::Up } else { Health::Down(format!("{} down", self.kind)) }
        }
        fn tick(&mut self) -> Option<ControlMsg> {
            None
        }
        fn handle_report(&mut self, msg: &ControlMsg) -> bool {
            if let ControlMsg::SleeveState { receiving } = msg {
                if self.kind == "fastpath" {
                    self.up = *receiving;
                    return true;
                }
            }
            false
        }
        fn activate(&mut self) {
            self.active.lock().expect("log").push(format!("+{}", self.kind));
        }
        fn deactivate(&mut self) {
            self.active.lock().expect("log").push(format!("-{}", self.kind));
        }
    }

    #[test]
    fn prefers_the_first_working_path_and_falls_back() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let fast = Box::new(Fake { kind: "fastpath", up: false, active: log.clone() });
        let sleeve = Box::new(Fake { kind: "sleeve", up: true, active: log.clone() });
        let mut p = Paths::new(vec![fast, sleeve]);
        assert_eq!(p.describe().0, "pending");
        assert!(p.tick().1);
        assert_eq!(p.active(), Some("sleeve"));
        // The fastpath's probes start working: it takes over.
        assert!(p.handle_report(&ControlMsg::SleeveState { receiving: true }));
        assert_eq!(p.active(), Some("fastpath"));
        // And breaks again: back to the sleeve.
        assert!(p.handle_report(&ControlMsg::SleeveState { receiving: false }));
        assert_eq!(p.active(), Some("sleeve"));
        assert_eq!(*log.lock().expect("log"), vec!["+sleeve", "-sleeve", "+fastpath", "-fastpath", "+sleeve"]);
        assert_eq!(p.describe(), ("established", "sleeve: fastpath down".to_string()));
        assert!(p.handle_report(&ControlMsg::SleeveState { receiving: true }));
        assert_eq!(p.describe(), ("established", "fastpath".to_string()));
    }

    #[test]
    fn no_working_path_is_pending_with_a_reason() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut p = Paths::new(vec![Box::new(Fake { kind: "sleeve", up: false, active: log })]);
        assert!(!p.tick().1);
        assert_eq!(p.describe(), ("pending", "waiting: sleeve down".to_string()));
    }

    #[test]
    fn a_note_says_why_the_preferred_path_is_missing() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut p = Paths::new(vec![Box::new(Fake { kind: "sleeve", up: true, active: log })])
            .with_note("encrypted mesh and 192.0.2.7 is not in --trusted-subnets".into());
        assert!(p.tick().1);
        assert_eq!(p.describe(), ("established", "sleeve: encrypted mesh and 192.0.2.7 is not in --trusted-subnets".to_string()));
    }
}
