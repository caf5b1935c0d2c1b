//! Load balancing among a backend's endpoints: power of two choices over
//! peak-EWMA latency weighted by requests in flight (Linkerd's and
//! Finagle's choice), with failure accrual: consecutive failures eject an
//! endpoint for an exponentially growing time, after which one request probes
//! it; a success restores it, a failure ejects it again for longer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::endpoint::Endpoint;

/// Consecutive failures that eject an endpoint.
pub const FAILURES_TO_EJECT: u32 = 5;
/// First ejection; doubles on each re-ejection up to [`MAX_EJECTION`].
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
/// Longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);
/// How fast the latency estimate forgets.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint not measured yet: optimistic, so new endpoints get traffic.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;

#[derive(Debug)]
struct Stats {
    ewma_ns: f64,
    updated: Instant,
    pending: u32,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl Stats {
    fn new(now: Instant) -> Self {
        Self {
            ewma_ns: DEFAULT_RTT_NS,
            updated: now,
            pending: 0,
            consecutive_failures: 0,
            ejected_until: None,
            ejections: 0,
        }
    }

    /// Cost of sending here now: decayed latency × (in flight + 1).
    fn cost(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let decay = (-elapsed / DECAY.as_secs_f64()).exp();
        // An idle endpoint's estimate decays, so a once-slow endpoint is tried again.
        (self.ewma_ns * decay).max(1.0) * f64::from(self.pending + 1)
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        if sample > self.ewma_ns {
            // Peak: jump up at once, decay down slowly.
            self.ewma_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.ewma_ns = self.ewma_ns * w + sample * (1.0 - w);
        }
        self.updated = now;
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }
}

/// An endpoint unmeasured this long has decayed to nothing and is forgotten.
const FORGET: Duration = Duration::from_secs(10 * DECAY.as_secs());
/// Endpoints tracked before the first sweep of forgotten ones.
const SWEEP_FROM: usize = 64;

/// Per-endpoint statistics, shared by every request of the proxy.
#[derive(Debug)]
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddr, Stats>>,
    /// Sweep when a new endpoint would make this many: twice what the last
    /// sweep left, so Pods that come and go do not grow the map for ever.
    sweep_at: AtomicUsize,
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            stats: Mutex::default(),
            sweep_at: AtomicUsize::new(SWEEP_FROM),
        }
    }
}

/// Whether an endpoint's statistics still say anything: in flight,
/// ejected, or measured within [`FORGET`].
fn worth_keeping(s: &Stats, now: Instant) -> bool {
    s.pending > 0 || s.ejected(now) || now.saturating_duration_since(s.updated) < FORGET
}

/// An endpoint chosen for one attempt; report the outcome with
/// [`Balancer::done`]. One dropped without an outcome (its request timed out
/// as a whole, or its client went away) still releases its endpoint: a
/// count in flight left behind would weigh on that endpoint for ever.
#[derive(Debug)]
pub struct Pick<'a> {
    /// The endpoint.
    pub addr: SocketAddr,
    /// Its index in the candidate list.
    pub index: usize,
    started: Instant,
    /// Whom to tell if no outcome is reported; `None` once it is.
    balancer: Option<&'a Balancer>,
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.balancer.take() {
            b.abandoned(self.addr, self.started);
        }
    }
}

impl Balancer {
    /// Picks one of `endpoints` (ready ones; all when none is ready), avoiding
    /// `avoid` (endpoints already tried for this request) when possible.
    pub fn pick(&self, endpoints: &[Endpoint], avoid: &[SocketAddr]) -> Option<Pick<'_>> {
        let now = Instant::now();
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        // Narrowed step by step, each step kept only if it leaves someone:
        // ready endpoints, then those not yet tried for this request, then
        // those not ejected (everything ejected: better to try than to fail
        // outright). Counted in passes rather than collected: this runs for
        // every request.
        let mut narrow = [false; 3];
        let fits = |e: &Endpoint, narrow: &[bool; 3]| -> bool {
            let Some(addr) = e.addr else { return false };
            (!narrow[0] || e.ready())
                && (!narrow[1] || !avoid.contains(&addr))
                && (!narrow[2] || !stats.get(&addr).is_some_and(|s| s.ejected(now)))
        };
        for step in 0..narrow.len() {
            let mut tighter = narrow;
            tighter[step] = true;
            narrow[step] = endpoints.iter().any(|e| fits(e, &tighter));
        }
        let candidates = || endpoints.iter().enumerate().filter(|(_, e)| fits(e, &narrow));
        let (index, endpoint) = match candidates().count() {
            0 => return None,
            1 => candidates().next()?,
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates().nth(a)?, candidates().nth(b)?);
                let cost = |e: &Endpoint| {
                    e.addr
                        .and_then(|addr| stats.get(&addr))
                        .map_or(DEFAULT_RTT_NS, |s| s.cost(now))
                };
                if cost(a.1) <= cost(b.1) { a } else { b }
            }
        };
        let addr = endpoint.addr?;
        if !stats.contains_key(&addr) && stats.len() + 1 >= self.sweep_at.load(Relaxed) {
            stats.retain(|_, s| worth_keeping(s, now));
            self.sweep_at.store((2 * stats.len()).max(SWEEP_FROM), Relaxed);
        }
        stats.entry(addr).or_insert_with(|| Stats::new(now)).pending += 1;
        Some(Pick {
            addr,
            index,
            started: now,
            balancer: Some(self),
        })
    }

    /// An attempt ended without an outcome: no longer in flight, and the
    /// time it ran is a lower bound on its latency (never an improvement).
    fn abandoned(&self, addr: SocketAddr, started: Instant) {
        let now = Instant::now();
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats.get_mut(&addr) {
            s.pending = s.pending.saturating_sub(1);
            let at_least = now.saturating_duration_since(started).as_nanos() as f64;
            if at_least > s.ewma_ns {
                s.ewma_ns = at_least;
                s.updated = now;
            }
        }
    }

    /// Records an attempt's outcome: latency and success or failure. True
    /// when this failure ejected the endpoint (for the ejection counter).
    pub fn done(&self, mut pick: Pick<'_>, success: bool) -> bool {
        pick.balancer = None;
        let now = Instant::now();
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = stats.entry(pick.addr).or_insert_with(|| Stats::new(now));
        s.pending = s.pending.saturating_sub(1);
        s.observe(now.saturating_duration_since(pick.started), now);
        if success {
            s.consecutive_failures = 0;
            s.ejections = 0;
            s.ejected_until = None;
            return false;
        }
        s.consecutive_failures += 1;
        // Once ejected, a single failed probe ejects again.
        let threshold = if s.ejections > 0 { 1 } else { FAILURES_TO_EJECT };
        if s.consecutive_failures >= threshold && !s.ejected(now) {
            let ejection = BASE_EJECTION.saturating_mul(1 << s.ejections.min(5)).min(MAX_EJECTION);
            s.ejections += 1;
            s.ejected_until = Some(now + ejection);
            tracing::info!(endpoint = %pick.addr, ?ejection, "endpoint ejected after consecutive failures");
            return true;
        }
        false
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.stats
            .lock()
            .map(|s| s.get(&addr).is_some_and(|s| s.ejected(now)))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidemesh_proto::destination::v1 as pb;

    fn ep(port: u16) -> Endpoint {
        pb::Endpoint {
            address: "10.0.0.1".into(),
            port: u32::from(port),
            ready: true,
            ..Default::default()
        }
        .into()
    }

    #[test]
    fn slow_endpoints_lose_traffic_and_failing_ones_are_ejected() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2), ep(3)];
        // Endpoint 1 is 10x slower.
        for _ in 0..300 {
            let p = b.pick(&eps, &[]).expect("pick");
            let mut p = p;
            p.started -= if p.addr.port() == 1 {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(1)
            };
            b.done(p, true);
        }
        let slow = (0..1000)
            .filter(|_| {
                let p = b.pick(&eps, &[]).expect("pick");
                let slow = p.addr.port() == 1;
                b.done(p, true);
                slow
            })
            .count();
        assert!(slow < 100, "slow endpoint still got {slow}/1000");

        for _ in 0..FAILURES_TO_EJECT {
            let p = Pick {
                addr: "10.0.0.1:2".parse().expect("addr"),
                index: 1,
                started: Instant::now(),
                balancer: None,
            };
            b.done(p, false);
        }
        assert!(b.is_ejected("10.0.0.1:2".parse().expect("addr")));
        assert!((0..200).all(|_| {
            let p = b.pick(&eps, &[]).expect("pick");
            let ok = p.addr.port() != 2;
            b.done(p, true);
            ok
        }));
    }

    #[test]
    fn retries_avoid_endpoints_already_tried() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2)];
        let first: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        assert!((0..100).all(|_| {
            let p = b.pick(&eps, &[first]).expect("pick");
            let ok = p.addr != first;
            b.done(p, true);
            ok
        }));
    }

    #[test]
    fn each_narrowing_gives_way_only_when_it_would_leave_nobody() {
        let b = Balancer::default();
        let ports = |eps: &[Endpoint], avoid: &[SocketAddr]| -> std::collections::BTreeSet<u16> {
            (0..200)
                .filter_map(|_| b.pick(eps, avoid).map(|p| p.addr.port()))
                .collect()
        };
        let not_ready = |port| {
            let mut e = ep(port);
            e.raw.ready = false;
            e
        };
        let unusable = |port| Endpoint { addr: None, ..ep(port) };
        let addr = |port| SocketAddr::from(([10, 0, 0, 1], port));
        // Ready ones first; the others only when none is ready; no address, never.
        assert_eq!(ports(&[ep(1), not_ready(2), unusable(3)], &[]), [1].into());
        assert_eq!(ports(&[not_ready(2), unusable(3)], &[]), [2].into());
        assert_eq!(ports(&[unusable(3)], &[]), [].into());
        assert_eq!(ports(&[], &[]), [].into());
        // Not tried yet, among the ready; tried ones again when all were.
        assert_eq!(ports(&[ep(1), ep(2), not_ready(3)], &[addr(1)]), [2].into());
        let again = ports(&[ep(1), ep(2), not_ready(3)], &[addr(1), addr(2)]);
        assert!(!again.is_empty() && again.is_subset(&[1, 2].into()), "{again:?}");
        // Not ejected; ejected ones when everyone is.
        for _ in 0..FAILURES_TO_EJECT {
            let p = b.pick(&[ep(1)], &[]).expect("pick");
            b.done(p, false);
        }
        assert_eq!(ports(&[ep(1), ep(2)], &[]), [2].into());
        assert_eq!(
            ports(&[ep(1), ep(2)], &[addr(2)]),
            [1].into(),
            "not tried comes before not ejected"
        );
        assert_eq!(ports(&[ep(1)], &[]), [1].into());
    }

    /// Share of 1000 picks (each reported at once) that go to port `port`.
    fn share(b: &Balancer, eps: &[Endpoint], port: u16) -> usize {
        (0..1000)
            .filter(|_| {
                let p = b.pick(eps, &[]).expect("pick");
                let hit = p.addr.port() == port;
                b.done(p, true);
                hit
            })
            .count()
    }

    #[test]
    fn abandoned_attempts_release_their_endpoint() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2)];
        let in_flight = |b: &Balancer| {
            b.stats
                .lock()
                .map(|s| s.values().map(|s| s.pending).sum::<u32>())
                .unwrap_or(u32::MAX)
        };
        let picks: Vec<Pick<'_>> = (0..50).map(|_| b.pick(&eps, &[]).expect("pick")).collect();
        assert_eq!(in_flight(&b), 50);
        // Dropped without an outcome, as a request timeout or a departed
        // client drops them: nothing stays counted against the endpoints.
        drop(picks);
        assert_eq!(in_flight(&b), 0);
        // Both on one endpoint, so a double release would show.
        let held = b.pick(&eps[..1], &[]).expect("pick");
        let p = b.pick(&eps[..1], &[]).expect("pick");
        b.done(p, true);
        assert_eq!(in_flight(&b), 1, "a reported pick is released once, not twice");
        drop(held);
        assert_eq!(in_flight(&b), 0);
    }

    #[test]
    fn an_attempt_abandoned_late_counts_as_slow_never_as_fast() {
        let b = Balancer::default();
        let eps = vec![ep(1), ep(2)];
        let mut p = b.pick(&eps[..1], &[]).expect("pick");
        // Ran 50 ms (50x the default estimate) before its request timed out.
        p.started -= Duration::from_millis(50);
        drop(p);
        let to_1 = share(&b, &eps, 1);
        assert!(to_1 < 100, "endpoint 1 still got {to_1}/1000");
    }

    #[test]
    fn endpoints_long_unmeasured_are_forgotten_others_kept() {
        let now = Instant::now();
        let mut idle = Stats::new(now);
        idle.updated = now.checked_sub(FORGET + Duration::from_secs(1)).unwrap_or(now);
        if now.saturating_duration_since(idle.updated) < FORGET {
            return; // the clock is too young to go back that far
        }
        assert!(!worth_keeping(&idle, now));
        let mut busy = Stats::new(idle.updated);
        busy.pending = 1;
        assert!(worth_keeping(&busy, now), "in flight");
        let mut ejected = Stats::new(idle.updated);
        ejected.ejected_until = Some(now + Duration::from_secs(5));
        assert!(worth_keeping(&ejected, now), "ejected");
        assert!(worth_keeping(&Stats::new(now), now), "recent");
        // Sweeps happen as new endpoints arrive, and keep the live ones.
        let b = Balancer::default();
        let many: Vec<Endpoint> = (1..=200).map(ep).collect();
        for e in many.chunks(1) {
            let p = b.pick(e, &[]).expect("pick");
            b.done(p, true);
        }
        assert_eq!(
            b.stats.lock().map(|s| s.len()).unwrap_or(0),
            200,
            "all recent: none forgotten"
        );
        // Those 200 go quiet for good (their Pods are gone); new ones arrive.
        if let Ok(mut stats) = b.stats.lock() {
            for s in stats.values_mut() {
                s.updated = idle.updated;
            }
        }
        let newer: Vec<Endpoint> = (201..=300).map(ep).collect();
        for e in newer.chunks(1) {
            let p = b.pick(e, &[]).expect("pick");
            b.done(p, true);
        }
        let quiet_left = b
            .stats
            .lock()
            .map(|s| s.keys().filter(|a| a.port() <= 200).count())
            .unwrap_or(usize::MAX);
        assert_eq!(quiet_left, 0, "the quiet endpoints were not forgotten");
        assert_eq!(
            b.stats.lock().map(|s| s.len()).unwrap_or(0),
            100,
            "the new ones are all kept"
        );
    }
}
