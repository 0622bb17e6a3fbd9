//! A Lessor server inside the test process, on a port the OS picks (port 0), with a client for it.

use std::sync::Arc;

use lessor_client::Client;
use lessor_core::time::{ManualClock, SharedClock};
use lessor_server::{Config, RunningServer};

/// Starts a server for `config` on `127.0.0.1:0` (the system clock when `clock` is `None`) and returns it with a
/// client for it. Stop it with [`RunningServer::stop`] (dropping it stops it too).
///
/// # Panics
/// When the server does not start.
pub async fn start(config: &Config, clock: Option<SharedClock>) -> (RunningServer, Client) {
    let srv = match lessor_server::start(config, "127.0.0.1:0", clock).await {
        Ok(srv) => srv,
        Err(e) => panic!("the in-process server did not start: {e}"),
    };
    let client = Client::new(&srv.endpoint()).expect("a client for the in-process server");
    (srv, client)
}

/// A memory-only server on the system clock.
pub async fn memory() -> (RunningServer, Client) {
    start(&Config::memory(), None).await
}

/// A memory-only server on a [`ManualClock`] starting now, returned with the clock so the test moves time.
pub async fn memory_with_manual_clock() -> (RunningServer, Client, ManualClock) {
    let clock = ManualClock::starting_now();
    let (srv, client) = start(&Config::memory(), Some(Arc::new(clock.clone()))).await;
    (srv, client, clock)
}
