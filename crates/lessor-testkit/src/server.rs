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

/// A memory-only server with auth on (the internal backend, no open door) and the namespaces `namespaces` created:
/// the server, a client without a key, and a client with the bootstrap admin key.
///
/// # Panics
/// When the server does not start or a namespace cannot be created.
pub async fn with_auth(namespaces: &[&str]) -> (RunningServer, Client, Client) {
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("admin.key");
    let yaml = format!(
        "queue-storage:\n  driver: memory\n\
         partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
         auth-backend:\n  driver: internal\n  open-door: false\n  bootstrap-key-file: {}\n",
        key_file.display()
    );
    let (srv, anonymous) = start(&Config::from_yaml(&yaml).expect("config"), None).await;
    let admin = anonymous
        .clone()
        .with_api_key(std::fs::read_to_string(&key_file).expect("key").trim());
    for ns in namespaces {
        admin
            .namespaces_create(&lessor_client::proto::NamespaceInfo {
                name: (*ns).into(),
                ..Default::default()
            })
            .await
            .expect("namespace");
    }
    (srv, anonymous, admin)
}

/// Creates user `user`, a role `role` in `namespace` holding `permissions`, binds the user to it, and returns a
/// client (made from `anonymous`) with a key of that user.
///
/// # Panics
/// When the admin calls fail.
pub async fn user_with_role(
    admin: &Client,
    anonymous: &Client,
    user: &str,
    namespace: &str,
    role: &str,
    permissions: &[&str],
) -> Client {
    use lessor_client::proto as pb;
    let user_id = admin
        .users_create(&pb::UserCreateRequest {
            username: user.into(),
            ..Default::default()
        })
        .await
        .expect("user")
        .id;
    admin
        .roles_create(&pb::RoleCreateRequest {
            namespace: namespace.into(),
            name: role.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
        })
        .await
        .expect("role");
    admin
        .rolebindings_create(&pb::RoleBindingCreateRequest {
            namespace: namespace.into(),
            role_name: role.into(),
            user_id: user_id.clone(),
        })
        .await
        .expect("binding");
    let key = admin
        .apikeys_create(&pb::APIKeyCreateRequest {
            user_id,
            name: user.into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .key;
    anonymous.clone().with_api_key(key)
}

tokio::task_local! {
    /// The backend the current test runs its server on: "memory" (also when unset), "fjall" or "postgres". Set by
    /// the tests [`crate::every_backend!`] generates.
    pub static BACKEND: &'static str;
}

/// A server on the current test's [`BACKEND`] and a [`ManualClock`], with what keeps its storage alive (a
/// temporary directory, a database dropped at the end).
pub struct BackendServer {
    /// The server (an `Option` so a test can take it to stop it).
    pub server: Option<RunningServer>,
    /// A client of it.
    pub client: Client,
    /// The clock the server runs on; tests move it.
    pub clock: ManualClock,
    config: Config,
    _dir: Option<tempfile::TempDir>,
    _db: Option<crate::TestDatabase>,
}

/// The configuration that keeps queue definitions and partitions both in the database at `url`.
///
/// # Panics
/// When the YAML does not parse (a bug here).
pub fn postgres_config(url: &str) -> Config {
    // A single-quoted YAML scalar: only the quote itself needs escaping.
    let url = format!("'{}'", url.replace('\'', "''"));
    Config::from_yaml(&format!(
        "queue-storage:\n  driver: postgres\n  config:\n    connection-string: {url}\n\
         partition-storage:\n  - name: pg-0\n    driver: postgres\n    affinity: 1\n    \
         config:\n      connection-string: {url}\n"
    ))
    .expect("postgres config")
}

/// Starts a server on the current test's [`BACKEND`] (a fresh temporary directory for fjall, a fresh database
/// for postgres) on a manual clock starting now; its client speaks `encoding`.
///
/// # Panics
/// When the server does not start, or postgres is asked for without a test database.
pub async fn on_backend(encoding: lessor_client::Encoding) -> BackendServer {
    let backend = BACKEND.try_with(|b| *b).unwrap_or("memory");
    let (config, dir, db) = match backend {
        "fjall" => {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().to_str().expect("utf-8 path").to_string();
            (Config::default_persistent(&path), Some(dir), None)
        }
        "postgres" => {
            let d = crate::TestDatabase::create("lessor_t").await;
            (postgres_config(d.url()), None, Some(d))
        }
        _ => (Config::memory(), None, None),
    };
    let clock = ManualClock::starting_now();
    let (server, client) = start(&config, Some(Arc::new(clock.clone()))).await;
    BackendServer {
        server: Some(server),
        client: client.with_encoding(encoding),
        clock,
        config,
        _dir: dir,
        _db: db,
    }
}

impl BackendServer {
    /// The backend this server runs on ("memory", "fjall" or "postgres").
    pub fn backend(&self) -> &'static str {
        BACKEND.try_with(|b| *b).unwrap_or("memory")
    }

    /// Stops the server and starts a new one on the same storage and clock (a memory server starts empty), with a
    /// client of the same encoding in [`BackendServer::client`].
    ///
    /// # Panics
    /// When the new server does not start.
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        let encoding = self.client.encoding();
        let (server, client) = start(&self.config, Some(Arc::new(self.clock.clone()))).await;
        self.server = Some(server);
        self.client = client.with_encoding(encoding);
    }
}

/// Declares each named `async fn(lessor_client::Encoding)` of the calling test file as a test on every backend:
/// memory with protobuf and with JSON, then (with the calling crate's `fjall` and `postgres` features) fjall and
/// postgres with protobuf. The function starts its server with [`on_backend`]; postgres tests skip (fail under CI)
/// without a test database.
#[macro_export]
macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {
        mod protobuf {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(lessor_client::Encoding::Protobuf).await } )*
        }
        mod json {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(lessor_client::Encoding::Json).await } )*
        }
        #[cfg(feature = "fjall")]
        mod fjall {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   $crate::server::BACKEND
                       .scope("fjall", super::$name(lessor_client::Encoding::Protobuf))
                       .await
               } )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() {
                   if $crate::database_or_skip().is_none() {
                       return;
                   }
                   $crate::server::BACKEND
                       .scope("postgres", super::$name(lessor_client::Encoding::Protobuf))
                       .await
               } )*
        }
    };
}

/// Creates queue `name` (1-minute leases, 24-hour expiry, one partition) after `f` adjusted the definition.
///
/// # Panics
/// When the server refuses it.
pub async fn create_queue(client: &Client, name: &str, f: impl FnOnce(&mut lessor_client::proto::QueueInfo)) {
    let mut q = lessor_client::proto::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 1,
        ..Default::default()
    };
    f(&mut q);
    client.queues_create(&q).await.expect("create queue");
}

/// Leases up to `n` items of `queue` as consumer `consumer`, waiting at most 5 s.
pub async fn lease(
    client: &Client,
    queue: &str,
    n: i32,
    consumer: &str,
) -> Result<lessor_client::proto::QueueLeaseResponse, lessor_client::ClientError> {
    client
        .queue_lease(&lessor_client::proto::QueueLeaseRequest {
            queue_name: queue.into(),
            batch_size: n,
            client_id: consumer.into(),
            request_timeout: "5s".into(),
        })
        .await
}
