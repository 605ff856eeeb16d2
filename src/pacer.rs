//! Paced log lines: for the lines a remote caller can trigger at will (a refused request, a
//! connection beyond a bound). One line per interval at most, with a count of those held back, so a
//! flood of bad requests can neither fill the disk nor bury the lines an operator needs — and the
//! count still says how big the flood was.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one line per `interval`; counts the ones it held back. On the system's clock, not
/// tokio's: a pacer may be a `static` shared by every runtime of the process (tests pause theirs).
#[derive(Debug)]
pub struct LinePacer {
    interval: Duration,
    /// When the last line was let through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LinePacer {
    /// A pacer letting one line through per `interval` (usable in a `static`).
    pub const fn new(interval: Duration) -> Self {
        LinePacer {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(lines held back since the last one)` if a line may be written now.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`LinePacer::admit`] at `now`.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, held) = &mut *state;
        if last.is_some_and(|at| now < at + self.interval) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

#[cfg(test)]
mod tests {
    use super::LinePacer;
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_writes_one_line_an_interval_with_the_count_held_back() {
        let pacer = LinePacer::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(pacer.admit_at(start), Some(0));
        let held = (1..1000)
            .filter(|n| {
                pacer
                    .admit_at(start + Duration::from_micros(n * 100))
                    .is_none()
            })
            .count();
        assert_eq!(held, 999);
        assert_eq!(pacer.admit_at(start + Duration::from_secs(1)), Some(999));
        assert_eq!(pacer.admit_at(start + Duration::from_millis(1500)), None);
        assert_eq!(pacer.admit_at(start + Duration::from_secs(2)), Some(1));
    }
}
