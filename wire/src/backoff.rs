//! Doubling backoff: how long to wait before the next try after failures (reconnecting to
//! an agent, QMP or libvirt; polling for what has not happened yet).

use std::time::Duration;

/// Waits that double from `first` up to `max`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starting at `first`, never more than `max` (`first` is capped by `max` too).
    pub fn new(first: Duration, max: Duration) -> Self {
        let first = first.min(max);
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next try, without advancing.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The wait before the next try; the one after it is twice as long (up to the max).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(self.max);
        wait
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_max_and_starts_over_after_a_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| b.next_wait()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!((b.peek(), b.next_wait()), (ms(100), ms(100)));
        assert_eq!(
            Backoff::new(ms(50), ms(10)).peek(),
            ms(10),
            "first capped by max"
        );
    }
}
