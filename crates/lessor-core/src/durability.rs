//! Deferred durability: lets a queue task go on to its next pass while the fsync of the last one runs, and answer
//! each request only once what it wrote is on disk.
//!
//! # Why
//! A queue task makes one storage call per partition per kind in a pass (produce, complete, lease...), one after the
//! other. When each call returned only after its own fsync, a pass took one fsync per kind and the next pass waited
//! for all of them: on a single partition with producers and consumers, three fsyncs per pass bounded the queue,
//! with the process half idle (docs/benchmarks.md). A persistent store can instead return from a write once it is
//! written, hand its fsync wait to the pass ([`defer`]), and the pass answers its requests when every such wait
//! succeeded ([`Pass::finish`]). Writes are ordered, so a later pass's reply (a lease of an item this pass
//! produced) waits for an fsync that covers this pass's writes too; a failed fsync answers every request that
//! waited for it with the error.
//!
//! # The rule for callers
//! Only requests whose one dependency on durability is their reply run inside [`Pass::scope`] (produce, complete,
//! retry, extend, lease). Everything else, in particular an operation whose next step relies on its first being
//! durable (a rebalance copies items, then deletes the originals), runs outside a scope, where a store's write
//! returns once durable as before. A store waits for durability itself whenever it is called outside a scope.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use crate::error::StorageError;

/// A store's promise that one write becomes durable (or that it failed to).
pub type Durable = oneshot::Receiver<Result<(), StorageError>>;

/// What a pass's gate ends with: `None` while its writes are not known durable.
type Outcome = Option<Result<(), StorageError>>;

tokio::task_local! {
    static PASS: Arc<Pass>;
}

/// The deferred writes of one pass of a queue task, and the gate its replies wait behind.
pub struct Pass {
    waits: Mutex<Vec<Durable>>,
    /// Whether a write was deferred to this pass yet: a reply sent before any was needs no gate.
    deferred: AtomicBool,
    gate: watch::Sender<Outcome>,
}

/// A reply's wait for the durability of the pass that sent it.
#[derive(Clone, Debug)]
pub struct Gate(watch::Receiver<Outcome>);

impl Pass {
    /// A pass with no deferred write yet.
    pub fn new() -> Arc<Pass> {
        Arc::new(Pass {
            waits: Mutex::new(Vec::new()),
            deferred: AtomicBool::new(false),
            gate: watch::channel(None).0,
        })
    }

    /// Runs `f` so that the writes it makes are deferred to this pass, and the replies it sends carry its gate.
    pub async fn scope<F: std::future::Future>(self: &Arc<Pass>, f: F) -> F::Output {
        PASS.scope(self.clone(), f).await
    }

    /// The gate of this pass when a write was deferred to it, for answers of later passes that vouch for its
    /// writes (see [`Gate::is_durable`]).
    pub fn pending(&self) -> Option<Gate> {
        self.deferred
            .load(Ordering::Acquire)
            .then(|| Gate(self.gate.subscribe()))
    }

    /// Ends the pass: its gate opens once every deferred write is durable (at once when there is none), with the
    /// first failure if one failed. Waits off the caller's task, so the queue task goes on to its next pass.
    pub fn finish(self: Arc<Pass>) {
        let waits = std::mem::take(&mut *self.waits.lock().unwrap_or_else(|e| e.into_inner()));
        if waits.is_empty() {
            self.gate.send_replace(Some(Ok(())));
            return;
        }
        tokio::spawn(async move {
            let mut outcome = Ok(());
            for w in waits {
                let r = w.await.unwrap_or_else(|_| {
                    Err(StorageError::unavailable(
                        "the store closed before a write was known durable",
                    ))
                });
                if outcome.is_ok() {
                    outcome = r;
                }
            }
            self.gate.send_replace(Some(outcome));
        });
    }
}

impl Gate {
    /// Whether the pass's writes are known durable (waiting would return at once, with success).
    pub fn is_durable(&self) -> bool {
        matches!(*self.0.borrow(), Some(Ok(())))
    }

    /// Waits until the pass's writes are durable; the store's error when one of them failed.
    pub async fn wait(mut self) -> Result<(), StorageError> {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Ok(())),
            // The pass was dropped without finishing (its task ended): nothing says its writes are durable.
            Err(_) => Err(StorageError::unavailable(
                "the queue task stopped before its writes were known durable",
            )),
        }
    }
}

/// For stores: inside a pass's scope, takes the wait for a written change's durability and returns `None` (the
/// pass waits for it); outside, hands it back for the caller to await.
pub fn defer(wait: Durable) -> Option<Durable> {
    let mut wait = Some(wait);
    let _ = PASS.try_with(|p| {
        if let Some(w) = wait.take() {
            p.waits.lock().unwrap_or_else(|e| e.into_inner()).push(w);
            p.deferred.store(true, Ordering::Release);
        }
    });
    wait
}

/// For stores: whether a write made now may return before it is durable (it is inside a pass's scope).
pub fn deferring() -> bool {
    PASS.try_with(|_| ()).is_ok()
}

/// The gate a reply sent now must wait behind: the pass's, when this runs in a pass's scope and a write was
/// deferred to it already. A reply sent before any (every reply on a store that never defers, such as memory) goes
/// out at once: what it answers for wrote nothing that waits. One sent after waits for the pass's later writes too
/// (one fsync usually covers them all).
pub fn gate() -> Option<Gate> {
    PASS.try_with(|p| {
        p.deferred
            .load(Ordering::Acquire)
            .then(|| Gate(p.gate.subscribe()))
    })
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies sent in a scope wait for every deferred write of the pass, including those deferred after them;
    /// outside a scope nothing is deferred.
    #[tokio::test]
    async fn the_gate_opens_when_every_deferred_write_is_durable() {
        assert!(!deferring());
        let (tx0, rx0) = oneshot::channel();
        assert!(defer(rx0).is_some(), "outside a scope the wait comes back");
        drop(tx0);

        let pass = Pass::new();
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let gate = pass
            .scope(async {
                assert!(deferring());
                assert!(gate().is_none(), "nothing deferred yet: nothing to wait for");
                assert!(defer(rx1).is_none());
                let g = gate().expect("in a scope");
                assert!(defer(rx2).is_none());
                g
            })
            .await;
        pass.clone().finish();
        let waiting = tokio::spawn(gate.clone().wait());
        tokio::task::yield_now().await;
        tx1.send(Ok(())).unwrap();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the second write is not durable yet");
        tx2.send(Err(StorageError::unavailable("fsync failed"))).unwrap();
        let r = waiting.await.unwrap();
        assert!(r.is_err(), "a failed write fails the pass's replies: {r:?}");
    }

    /// A pass without deferred writes gives its replies no gate (they go out at once); one whose writes all became
    /// durable opens it with success; one dropped unfinished fails its replies.
    #[tokio::test]
    async fn empty_durable_and_abandoned_passes() {
        let pass = Pass::new();
        assert!(pass.scope(async { gate() }).await.is_none());
        pass.finish();

        let pass = Pass::new();
        let (tx, rx) = oneshot::channel();
        let g = pass
            .scope(async {
                assert!(defer(rx).is_none());
                gate().expect("a write was deferred")
            })
            .await;
        pass.finish();
        tx.send(Ok(())).unwrap();
        assert!(g.wait().await.is_ok());

        let pass = Pass::new();
        let (_tx, rx) = oneshot::channel();
        let g = pass
            .scope(async {
                assert!(defer(rx).is_none());
                gate().expect("a write was deferred")
            })
            .await;
        drop(pass);
        assert!(g.wait().await.is_err());
    }
}
