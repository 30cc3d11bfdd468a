//! Log lines a guest can repeat, said often enough to notice and never without limit.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts an event and says whether to log it: the 1st, 2nd, 4th, 8th… occurrence, so a guest
/// that floods us with garbage cannot flood the log. Usable through `&self` (devices shared
/// between vCPU threads) as well as `&mut self`.
#[derive(Debug, Default)]
pub struct RateLimit(AtomicU64);

impl RateLimit {
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        n.is_power_of_two().then_some(n)
    }

    /// Events counted so far, logged or not (for the metrics).
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_powers_of_two() {
        let r = RateLimit::default();
        let logged: Vec<u64> = (0..20).filter_map(|_| r.hit()).collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16]);
    }
}
