//! The server-wide bound on request bytes held in memory (`limits.max-inflight-bytes`).
//!
//! A request's body stays in memory, decoded, from the moment it is read until it is answered: a produce waiting in
//! its queue's inbox behind a slow storage call holds its items all that time. Each inbox takes up to
//! `limits.max-requests-per-queue` requests, so without this bound one stuck queue could hold 4,096 produces of
//! 5 MB (20 GB), and every queue as much again. Every body read by an RPC is charged here as it arrives and the
//! charge is released when the request is answered; a body that does not fit waits up to `limits.inflight-wait`
//! for room, then gets 454 "server is overloaded", which clients retry.
//!
//! Charges are counted in KiB (at least one per request), so the bound also caps the number of requests in flight
//! and a charge fits the semaphore's `u32` permit count whatever the body limits. A body larger than the whole
//! bound is charged the whole bound: it waits until nothing else is in flight and then goes alone.
//!
//! Large bodies (above [`SMALL_BODY`]: produces, imports) may hold at most seven eighths of the bound between them;
//! the last eighth is kept for small requests, so that completes, retries and leases still get through while
//! producers keep the bound full (consumers that cannot complete would only make the backlog grow).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::error::ApiError;

/// Default `limits.max-inflight-bytes`: 1 GiB.
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 1 << 30;
/// Default `limits.inflight-wait`.
pub const DEFAULT_INFLIGHT_WAIT: Duration = Duration::from_secs(1);
/// The unit charges are counted in.
const UNIT: u64 = 1024;
/// Bodies up to this many units are small: they are charged to the whole bound only, larger ones to the large
/// bodies' share too.
const SMALL_BODY: u32 = 64;

/// The bound, shared by every request of a server.
#[derive(Debug)]
pub struct Inflight {
    room: Arc<Semaphore>,
    /// The large bodies' share of the bound (seven eighths of it; all of it when that leaves no unit).
    large: Arc<Semaphore>,
    /// Its size in units.
    large_units: u32,
    /// The bound in units.
    units: u32,
    /// The bound as configured, for the refusal's message.
    bytes: u64,
    wait: Duration,
}

/// What a request holds of the bound; dropping it gives the room back.
#[derive(Debug, Default)]
pub struct Charge {
    permit: Option<OwnedSemaphorePermit>,
    units: u32,
    /// The part of the large bodies' share held (units), for bodies above [`SMALL_BODY`].
    large: Option<OwnedSemaphorePermit>,
    large_units: u32,
}

impl Inflight {
    /// A bound of `bytes` (at least one unit; values above what fits in `u32` units, 4 TiB, are capped there),
    /// where a request waits up to `wait` for room.
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let units = u32::try_from(bytes / UNIT).unwrap_or(u32::MAX).max(1);
        let large_units = (units - units / 8).max(1);
        Inflight {
            room: Arc::new(Semaphore::new(units as usize)),
            large: Arc::new(Semaphore::new(large_units as usize)),
            large_units,
            units,
            bytes,
            wait,
        }
    }

    /// Bytes currently charged (for `/metrics` and tests).
    pub fn charged_bytes(&self) -> u64 {
        u64::from(
            self.units
                .saturating_sub(u32::try_from(self.room.available_permits()).unwrap_or(u32::MAX)),
        ) * UNIT
    }

    /// Grows `charge` to cover `total` bytes read so far, waiting up to the configured time for room.
    ///
    /// # Errors
    /// 454 "server is overloaded" when the room does not come in time.
    pub async fn cover(&self, charge: &mut Charge, total: usize) -> Result<(), ApiError> {
        let total = u64::try_from(total).unwrap_or(u64::MAX);
        let want = u32::try_from(total.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.units);
        if want <= charge.units {
            return Ok(());
        }
        // A large body holds its whole charge in the large bodies' share too (taken first: every request takes
        // the two in the same order).
        let large_want = if want > SMALL_BODY {
            want.min(self.large_units)
        } else {
            0
        };
        if large_want > charge.large_units {
            let permit = self.take(&self.large, large_want - charge.large_units).await?;
            merge(&mut charge.large, permit);
            charge.large_units = large_want;
        }
        let permit = self.take(&self.room, want - charge.units).await?;
        merge(&mut charge.permit, permit);
        charge.units = want;
        Ok(())
    }

    /// `n` units of `sem`, waiting up to the configured time.
    async fn take(&self, sem: &Arc<Semaphore>, n: u32) -> Result<OwnedSemaphorePermit, ApiError> {
        match sem.clone().try_acquire_many_owned(n) {
            Ok(p) => Ok(p),
            Err(TryAcquireError::NoPermits) if !self.wait.is_zero() => {
                match tokio::time::timeout(self.wait, sem.clone().acquire_many_owned(n)).await {
                    Ok(Ok(p)) => Ok(p),
                    _ => Err(ApiError::InflightFull(self.bytes)),
                }
            }
            Err(_) => Err(ApiError::InflightFull(self.bytes)),
        }
    }
}

/// Adds `permit` to what `held` holds.
fn merge(held: &mut Option<OwnedSemaphorePermit>, permit: OwnedSemaphorePermit) {
    match held {
        Some(p) => p.merge(permit),
        None => *held = Some(permit),
    }
}

impl Default for Inflight {
    fn default() -> Self {
        Inflight::new(DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_INFLIGHT_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_grow_with_the_body_and_are_released_when_dropped() {
        let gate = Inflight::new(10 * 1024, Duration::ZERO);
        let mut a = Charge::default();
        gate.cover(&mut a, 1).await.expect("a first byte");
        assert_eq!(gate.charged_bytes(), 1024);
        gate.cover(&mut a, 6000).await.expect("more of a");
        assert_eq!(gate.charged_bytes(), 6 * 1024);
        let mut b = Charge::default();
        let refused = gate.cover(&mut b, 5000).await.expect_err("b does not fit");
        assert_eq!(refused.code(), 454);
        assert!(
            refused.to_string().starts_with("server is overloaded; "),
            "{refused}"
        );
        drop(a);
        assert_eq!(gate.charged_bytes(), 0);
        gate.cover(&mut b, 5000).await.expect("b fits now");
    }

    /// Large bodies hold at most seven eighths of the bound between them: small requests (completes, leases) still
    /// get through while producers keep it full.
    #[tokio::test]
    async fn small_requests_keep_an_eighth_of_the_bound() {
        let gate = Inflight::new(1024 * 1024, Duration::ZERO);
        let mut large = Vec::new();
        loop {
            let mut c = Charge::default();
            if gate.cover(&mut c, 100 * 1024).await.is_err() {
                break;
            }
            large.push(c);
        }
        assert_eq!(large.len(), 8, "896 KiB of the 1 MiB bound, in bodies of 100 KiB");
        let mut small = Vec::new();
        for _ in 0..100 {
            let mut c = Charge::default();
            gate.cover(&mut c, 1000)
                .await
                .expect("a small request fits beside them");
            small.push(c);
        }
        drop(large);
        assert_eq!(gate.charged_bytes(), 100 * 1024);
    }

    #[tokio::test]
    async fn a_body_larger_than_the_bound_takes_all_of_it_and_a_waiter_gets_room_when_it_frees() {
        let gate = Arc::new(Inflight::new(4 * 1024, Duration::from_secs(5)));
        let mut big = Charge::default();
        gate.cover(&mut big, 1 << 20)
            .await
            .expect("alone, a large body goes");
        assert_eq!(gate.charged_bytes(), 4 * 1024);
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let mut c = Charge::default();
                gate.cover(&mut c, 10).await.map(|()| c)
            })
        };
        tokio::task::yield_now().await;
        drop(big);
        waiter
            .await
            .expect("task")
            .expect("the waiter is admitted once room frees");
    }
}
