//! Retries: the budget every retry draws on, the backoff between attempts,
//! and which outcomes are retried. The budget follows Finagle's (tower's
//! `TpsBudget`): each request deposits, each retry withdraws `1/ratio`, so
//! retries add at most `ratio` extra load over the window, plus a reserve of
//! `min_per_second` retries per second so low-traffic services can retry too.

use std::time::Duration;

use tower::retry::budget::{Budget as _, TpsBudget};

/// Bodies up to this size are buffered so the request can be retried.
pub const MAX_RETRY_BODY: usize = 64 * 1024;

/// A Service's retry budget.
#[derive(Debug)]
pub struct Budget {
    inner: TpsBudget,
    /// The ratio it was made with (to notice changes).
    pub ratio: f32,
}

impl Budget {
    /// `ratio` extra load over `window`, plus `min_per_second` retries per second.
    pub fn new(ratio: f32, min_per_second: u32, window: Duration) -> Self {
        // TpsBudget asserts on these bounds; values from the wire are clamped.
        let ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1000.0)
        } else {
            0.2
        };
        let window = window.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let min = min_per_second.min(1_000_000);
        Self {
            inner: TpsBudget::new(window, min, ratio),
            ratio,
        }
    }

    /// Counts a request (each request makes room for `ratio` retries).
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

/// Backoff before attempt `attempt` (2 = first retry): exponential from
/// `base`, full jitter, at most 1 s.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(2).min(10));
    exp.min(Duration::from_secs(1)).mul_f64(rand::random_range(0.5..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_ratio_plus_reserve() {
        let budget = Budget::new(0.2, 0, Duration::from_secs(10));
        for _ in 0..100 {
            budget.deposit();
        }
        let allowed = (0..100).filter(|_| budget.withdraw()).count();
        assert!((19..=21).contains(&allowed), "{allowed}");
        let reserve = Budget::new(0.2, 10, Duration::from_secs(10));
        let allowed = (0..1000).filter(|_| reserve.withdraw()).count();
        assert_eq!(allowed, 100, "10/s over a 10 s window");
    }

    #[test]
    fn hostile_parameters_do_not_panic() {
        let _ = Budget::new(f32::NAN, u32::MAX, Duration::ZERO);
        let _ = Budget::new(-1.0, 0, Duration::from_secs(3600));
        assert!(backoff(Duration::from_secs(100), 40) <= Duration::from_secs(1));
    }
}
