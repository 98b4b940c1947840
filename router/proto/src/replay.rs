//! Sliding replay window over 64-bit message counters (the bitmap ring of
//! RFC 6479 §2: blocks are cleared as the window advances, never shifted).

/// Words in the ring; one word is kept free so the window never wraps onto itself.
const WORDS: usize = 32;
/// Counters this far or further behind the highest accepted one are refused as too old.
pub const WINDOW: u64 = ((WORDS - 1) * 64) as u64;

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// The counter was already accepted.
    Replayed,
    /// The counter is behind the window.
    TooOld,
}

/// Remembers which counters were accepted recently.
///
/// Call [`ReplayWindow::check`] before authenticating a message and
/// [`ReplayWindow::commit`] only after it authenticated, so forged messages
/// cannot move the window.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { highest: None, bits: [0; WORDS] }
    }
}

impl ReplayWindow {
    /// Whether `c` would be accepted now.
    pub fn check(&self, c: u64) -> Result<(), ReplayError> {
        match self.highest {
            Some(h) if c <= h => {
                if h - c >= WINDOW {
                    return Err(ReplayError::TooOld);
                }
                if self.bits[word(c)] & bit(c) != 0 {
                    return Err(ReplayError::Replayed);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Records `c` as accepted. Checks again, so a racing duplicate is still refused.
    pub fn commit(&mut self, c: u64) -> Result<(), ReplayError> {
        self.check(c)?;
        match self.highest {
            Some(h) if c <= h => {}
            Some(h) => {
                // Clear the blocks the window moves into.
                let from = h / 64 + 1;
                let to = c / 64;
                // Zero when `c` is in the same block as `h`.
                let n = (to + 1).saturating_sub(from).min(WORDS as u64);
                for b in from..from + n {
                    self.bits[(b % WORDS as u64) as usize] = 0;
                }
                self.highest = Some(c);
            }
            None => {
                self.bits = [0; WORDS];
                self.highest = Some(c);
            }
        }
        self.bits[word(c)] |= bit(c);
        Ok(())
    }
}

fn word(c: u64) -> usize {
    ((c / 64) % WORDS as u64) as usize
}

fn bit(c: u64) -> u64 {
    1 << (c % 64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn duplicates_and_old_counters_are_refused() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.commit(5), Ok(()));
        assert_eq!(w.commit(5), Err(ReplayError::Replayed));
        assert_eq!(w.commit(3), Ok(()));
        assert_eq!(w.commit(3000), Ok(()));
        assert_eq!(w.commit(5), Err(ReplayError::TooOld));
        assert_eq!(w.commit(3000 - WINDOW + 1), Ok(()));
        assert_eq!(w.check(3000 - WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.commit(u64::MAX), Ok(()));
        assert_eq!(w.commit(u64::MAX), Err(ReplayError::Replayed));
    }

    #[test]
    fn check_does_not_move_the_window() {
        let mut w = ReplayWindow::default();
        w.commit(10).expect("first");
        assert_eq!(w.check(100_000), Ok(()));
        assert_eq!(w.commit(9), Ok(()), "check alone must not advance");
    }

    proptest! {
        /// Against a reference model (a set of everything accepted): a counter is
        /// accepted iff it is new and within the window of the highest so far.
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec(0u64..5000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut highest: Option<u64> = None;
            for c in ops {
                let expect_ok = !seen.contains(&c) && highest.is_none_or(|h| c > h || h - c < WINDOW);
                let got = w.commit(c).is_ok();
                prop_assert_eq!(got, expect_ok, "counter {}", c);
                if got {
                    seen.insert(c);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
            }
        }
    }
}
