//! Timestamps and the clock the engine reads time from.
//!
//! Every deadline in Lessor is a [`Ts`]: microseconds since the Unix epoch, the precision PostgreSQL keeps, so a
//! value survives every backend unchanged. The engine never calls the system clock directly: it asks a [`Clock`],
//! so tests inject a [`ManualClock`] and move time forward instead of sleeping.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// Microseconds since the Unix epoch. `Ts(0)` means "unset" wherever a field is optional.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Ts(pub i64);

impl Ts {
    /// The unset timestamp.
    pub const ZERO: Ts = Ts(0);
    /// A deadline that never comes.
    pub const NEVER: Ts = Ts(i64::MAX);

    /// Whether this timestamp is unset.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// This instant plus a duration, saturating instead of overflowing.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, d: Duration) -> Ts {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Ts(self.0.saturating_add(us))
    }

    /// Time from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Ts) -> Duration {
        Duration::from_micros(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }

    /// Converts a [`SystemTime`].
    pub fn from_system(t: SystemTime) -> Ts {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ts(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Ts(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

impl fmt::Debug for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ts({})", self.0)
    }
}

/// A boxed future, used so [`Clock`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the engine reads time from.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Ts;
    /// Resolves once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: Ts) -> BoxFuture<'static, ()>;
}

/// The wall clock, with tokio's timer for sleeping.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Ts {
        Ts::from_system(SystemTime::now())
    }

    fn sleep_until(&self, deadline: Ts) -> BoxFuture<'static, ()> {
        let wait = deadline.since(self.now());
        Box::pin(async move {
            // Cap a single sleep: a far-off deadline (Ts::NEVER) must not overflow tokio's timer.
            tokio::time::sleep(wait.min(Duration::from_secs(86_400 * 365))).await
        })
    }
}

/// A clock that only moves when told to; sleepers wake as soon as an advance passes their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    tx: Arc<watch::Sender<Ts>>,
}

impl ManualClock {
    /// A manual clock frozen at `start`.
    pub fn new(start: Ts) -> Self {
        let (tx, _rx) = watch::channel(start);
        ManualClock { tx: Arc::new(tx) }
    }

    /// A manual clock frozen at the current wall time.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now())
    }

    /// Moves time forward by `d` and wakes every sleeper whose deadline has passed.
    pub fn advance(&self, d: Duration) {
        self.tx.send_modify(|t| *t = t.add(d));
    }

    /// Sets the time (never backwards).
    pub fn set(&self, t: Ts) {
        self.tx.send_modify(|cur| *cur = (*cur).max(t));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Ts {
        *self.tx.borrow()
    }

    fn sleep_until(&self, deadline: Ts) -> BoxFuture<'static, ()> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            // wait_for returns an error only when the sender is gone; then nobody can advance time, so
            // pending forever is the honest answer.
            if rx.wait_for(|now| *now >= deadline).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_on_advance() {
        let c = ManualClock::new(Ts(1_000_000));
        let sleeper = tokio::spawn(c.sleep_until(Ts(3_000_000)));
        c.advance(Duration::from_secs(1));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        c.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woke")
            .expect("joined");
        assert_eq!(c.now(), Ts(3_000_000));
    }

    #[test]
    fn ts_arithmetic_saturates() {
        assert_eq!(Ts::NEVER.add(Duration::from_secs(1)), Ts::NEVER);
        assert_eq!(Ts(5).since(Ts(10)), Duration::ZERO);
    }
}
