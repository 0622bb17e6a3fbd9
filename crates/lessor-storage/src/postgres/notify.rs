//! Cross-server wakeups over PostgreSQL's LISTEN/NOTIFY.
//!
//! Without them a consumer long-polling on server B learns of an item produced on server A only when B's engine
//! re-reads the partition's counts (every 500 ms). With them, every write that makes items ready (produce, a retry
//! that requeues, a lifecycle pass that requeues expired leases or due scheduled items) also sends a notification
//! on [`CHANNEL`], pipelined after the write on the same connection, so it is sent once the write has committed and
//! costs no extra round trip. Each server keeps one connection per database that listens, and turns notifications
//! from other servers into [`Notice`]s for its engine.
//!
//! Nothing depends on a notification arriving: the periodic refresh stays, so a notification lost while the
//! listening connection is down (killed, database restarted, network stalled) delays an item by at most that
//! refresh. The listener reconnects on its own, backing off from 100 ms to 5 s.
//!
//! Payload: `<instance>\n<partition>\n<queue>` (queue names are at most 512 bytes, far below NOTIFY's 8,000);
//! the instance id (random per process and database) lets a server ignore its own notifications.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use lessor_core::storage::Notice;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;

use super::tls::RustlsConnect;

/// The channel every Lessor server on a database notifies and listens on.
pub(crate) const CHANNEL: &str = "lessor_ready";
/// Notices buffered for a slow engine; beyond this the oldest are dropped (the periodic refresh covers them).
const BUFFER: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One database's notifications for this process: the sending side's payloads and the listening connection.
pub(crate) struct Notifier {
    instance: String,
    tx: broadcast::Sender<Notice>,
    started: OnceLock<()>,
    config: tokio_postgres::Config,
    connector: RustlsConnect,
    /// Dropped with the notifier, which ends the listening task (and closes its connection) at once.
    _stop: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// A notifier for the database `config` connects to; listens only once [`Notifier::subscribe`] is called.
    pub(crate) fn new(config: tokio_postgres::Config, connector: RustlsConnect) -> Self {
        // Uniqueness is all that matters: the standard library's per-process random keys give it.
        use std::hash::BuildHasher;
        let id = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        Notifier {
            instance: format!("{id:016x}"),
            tx: broadcast::channel(BUFFER).0,
            started: OnceLock::new(),
            config,
            connector,
            _stop: tokio::sync::watch::channel(()).0,
        }
    }

    /// The payload announcing ready items in `partition` of `queue`.
    pub(crate) fn payload(&self, queue: &str, partition: u32) -> String {
        format!("{}\n{partition}\n{queue}", self.instance)
    }

    /// Notices from other servers; the first call starts the listening connection (needs the runtime).
    pub(crate) fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<Notice> {
        let rx = self.tx.subscribe();
        self.started.get_or_init(|| {
            tokio::spawn(listen(Arc::downgrade(self), self._stop.subscribe()));
        });
        rx
    }

    /// A notice for another server's payload; `None` for this process's own or a malformed one.
    fn parse(&self, payload: &str) -> Option<Notice> {
        let mut parts = payload.splitn(3, '\n');
        let (instance, partition, queue) = (parts.next()?, parts.next()?, parts.next()?);
        if instance == self.instance {
            return None;
        }
        Some(Notice {
            queue: queue.into(),
            partition: partition.parse().ok()?,
        })
    }
}

/// Keeps one connection listening while the notifier lives and anyone subscribes; reconnects with backoff.
async fn listen(notifier: Weak<Notifier>, mut stop: tokio::sync::watch::Receiver<()>) {
    tokio::select! {
        () = listen_until_dropped(notifier) => {}
        // Err: the notifier was dropped (its sender with it).
        _ = stop.changed() => {}
    }
}

async fn listen_until_dropped(notifier: Weak<Notifier>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(n) = notifier.upgrade() else { return };
        let (config, connector) = (n.config.clone(), n.connector.clone());
        drop(n);
        match config.connect(connector).await {
            Ok((client, mut connection)) => {
                // The connection delivers notifications only while polled: a task drives it and hands them over.
                let (mtx, mut mrx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                if mtx.send(n.payload().to_string()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres: the notification connection failed");
                                return;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        tracing::debug!("postgres: listening for other servers' notifications");
                        backoff = BACKOFF_MIN;
                        while let Some(payload) = mrx.recv().await {
                            let Some(n) = notifier.upgrade() else { return };
                            if n.tx.receiver_count() == 0 {
                                return;
                            }
                            if let Some(notice) = n.parse(&payload) {
                                let _ = n.tx.send(notice);
                            }
                        }
                        tracing::warn!("postgres: the notification connection closed; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "postgres: LISTEN failed; retrying"),
                }
                driver.abort();
            }
            Err(e) => tracing::debug!(error = %e, "postgres: cannot connect to listen; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier() -> Notifier {
        let config: tokio_postgres::Config = "host=127.0.0.1".parse().expect("config");
        let tls = super::super::tls::split("host=127.0.0.1").expect("split").1;
        Notifier::new(config, super::super::tls::connector(&tls).expect("connector"))
    }

    /// Payloads round-trip to notices for other servers, queue names with new lines included; a server's own
    /// payloads and malformed ones give none.
    #[test]
    fn payloads_name_queue_and_partition_and_skip_our_own() {
        let a = notifier();
        let b = notifier();
        assert_ne!(a.instance, b.instance);
        let p = a.payload("jobs", 7);
        assert_eq!(a.parse(&p), None, "our own");
        assert_eq!(
            b.parse(&p),
            Some(Notice {
                queue: "jobs".into(),
                partition: 7
            })
        );
        assert_eq!(
            b.parse(&a.payload("a\nb", 0)).map(|n| n.queue),
            Some("a\nb".into())
        );
        for bad in ["", "x", "x\ny", "x\n-1\nq", "x\n99999999999\nq"] {
            assert_eq!(b.parse(bad), None, "{bad:?}");
        }
    }
}
