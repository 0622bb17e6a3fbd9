//! Polling a condition until a deadline, instead of sleeping a fixed time and hoping.
//!
//! The probe returns `Ok(value)` when the condition holds, or `Err(what it saw)` when not yet; on timeout the last
//! `Err` is in the failure message, so a failing test says what it was waiting for and what it got.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] polls.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// The condition never held.
#[derive(Debug)]
pub struct Timeout {
    /// How long the probe was polled.
    pub waited: Duration,
    /// The probe's last answer.
    pub last: String,
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "still not after {:?}; last seen: {}", self.waited, self.last)
    }
}

/// Polls `probe` every `every` until it returns `Ok`, for at most `within` (the probe runs at least once, and once
/// more at the deadline).
pub async fn poll_until<T, F, Fut>(within: Duration, every: Duration, mut probe: F) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let t0 = Instant::now();
    loop {
        let last = match probe().await {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        let waited = t0.elapsed();
        if waited >= within {
            return Err(Timeout { waited, last });
        }
        tokio::time::sleep(every.min(within - waited)).await;
    }
}

/// Polls `probe` until it returns `Ok` and returns its value.
///
/// # Panics
/// When `within` passes first, with `what` (the condition waited for) and the probe's last answer.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match poll_until(within, POLL_EVERY, probe).await {
        Ok(v) => v,
        Err(t) => panic!("{what}: {t}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let n = AtomicU32::new(0);
        let v = eventually("three polls", Duration::from_secs(5), || async {
            let k = n.fetch_add(1, Ordering::SeqCst) + 1;
            if k >= 3 {
                Ok(k)
            } else {
                Err(format!("only {k}"))
            }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn times_out_with_the_last_answer() {
        let t = poll_until(Duration::from_millis(50), Duration::from_millis(5), || async {
            Err::<(), _>("never".to_string())
        })
        .await
        .expect_err("the condition never holds");
        assert_eq!(t.last, "never");
        assert!(t.waited >= Duration::from_millis(50));
        assert!(t.to_string().contains("last seen: never"), "{t}");
    }

    #[tokio::test]
    #[should_panic(expected = "the queue drains: still not after")]
    async fn eventually_panics_naming_the_condition() {
        eventually("the queue drains", Duration::from_millis(10), || async {
            Err::<(), _>("5 left".to_string())
        })
        .await;
    }
}
