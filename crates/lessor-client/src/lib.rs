//! Async client for the Lessor/Querator v1 HTTP API, used by the CLI and the black-box tests.
//!
//! Every API call is a `POST` of a [`lessor_proto`] message to a fixed path; the reply is decoded by its
//! `Content-Type`. The client speaks protobuf by default, like Querator's Go client, and JSON on request
//! ([`Client::with_encoding`]) so tests can exercise both encodings. It does no retries: check
//! [`ClientError::is_retryable`] and decide.
//!
//! # Layout
//! * [`Client`] — [`Client::call`] for any route, one typed method per route, plus [`Client::health`],
//!   [`Client::metrics`] and [`Client::raw`] for hand-made requests. The access-control calls
//!   (`namespaces_*`, `users_*`, `apikeys_*`, `roles_*`, `rolebindings_*`) live in their own module;
//!   [`Client::with_api_key`] sends a key with every request. Lessor's extension routes (`queue_extend`,
//!   `queue_pause`, `queue_resume`, `queue_browse`, `queue_redrive`, `redrive_*`) live in theirs too; a Querator
//!   server answers them 501.
//! * [`ClientError`] (module [`error`]) — what a call fails with.
//! * [`routes`] — the route table (re-exported from [`lessor_proto::routes`]): [`Client::call`] takes a route
//!   type, the typed methods fill it in.
//!
//! This crate is *not* a server or a CLI; it holds no state beyond a connection pool.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), lessor_client::ClientError> {
//! use lessor_client::Client;
//! use lessor_proto::{QueueLeaseRequest, QueueProduceItem, QueueProduceRequest};
//!
//! let client = Client::new("http://127.0.0.1:2319")?;
//! client
//!     .queue_produce(&QueueProduceRequest {
//!         queue_name: "orders".into(),
//!         request_timeout: "1m".into(),
//!         items: vec![QueueProduceItem { utf8: "hello".into(), ..Default::default() }],
//!     })
//!     .await?;
//! let leased = client
//!     .queue_lease(&QueueLeaseRequest {
//!         queue_name: "orders".into(),
//!         batch_size: 10,
//!         client_id: "worker-1".into(),
//!         request_timeout: "5s".into(),
//!     })
//!     .await?;
//! println!("{} item(s) from partition {}", leased.items.len(), leased.partition);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod admin;
pub mod error;
mod extensions;
pub mod routes;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use lessor_proto::{
    decode, encode, request_encoding, QueueClearRequest, QueueCompleteRequest, QueueInfo, QueueLeaseRequest,
    QueueLeaseResponse, QueueProduceRequest, QueueReloadRequest, QueueRetryRequest, QueueStatsRequest,
    QueueStatsResponse, QueuesDeleteRequest, QueuesInfoRequest, QueuesListRequest, QueuesListResponse, Rpc,
    StorageItemsDeleteRequest, StorageItemsImportRequest, StorageItemsImportResponse,
    StorageItemsListRequest, StorageItemsListResponse,
};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};

pub use error::ClientError;
/// The wire types, re-exported so callers need not depend on `lessor-proto` themselves.
pub use lessor_proto as proto;
pub use lessor_proto::Encoding;
pub use tls::TlsConfig;

/// The body of a backup being received (see [`Client::storage_backup`]).
#[derive(Debug)]
pub struct BackupStream(reqwest::Response);

impl BackupStream {
    /// The next chunk of the backup file, `None` at its end. A server that fails mid-way ends the body with an
    /// error, which shows here as [`ClientError::Transport`].
    ///
    /// # Errors
    /// [`ClientError::Transport`] when the connection or the server fails.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        Ok(self.0.chunk().await?)
    }
}

/// A handle on one Lessor (or Querator) server. Cloning is cheap and shares the connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Endpoint without a trailing slash, e.g. `http://127.0.0.1:2319`.
    endpoint: String,
    encoding: Encoding,
    api_key: Option<String>,
    /// The URLs of the routes called so far, parsed once: parsing one for every request was a measurable part of
    /// a busy client's CPU (docs/benchmarks.md).
    routes: Arc<RwLock<HashMap<&'static str, Url>>>,
}

impl Client {
    /// A client for `endpoint` (`http://host:port` or `https://host:port`, optionally with a path prefix), using
    /// protobuf. An `https://` endpoint trusts the built-in public roots; [`Client::with_tls`] adds a private CA
    /// or a client certificate.
    ///
    /// # Errors
    /// [`ClientError::InvalidEndpoint`] when the endpoint is not an `http://` or `https://` URL with a host.
    pub fn new(endpoint: &str) -> Result<Client, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
        };
        let url = Url::parse(endpoint).map_err(|e| invalid(&e.to_string()))?;
        match url.scheme() {
            "http" | "https" => {}
            _ => return Err(invalid("the scheme must be http or https")),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("missing host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("an endpoint cannot have a query or fragment"));
        }
        Ok(Client {
            http: reqwest::Client::new(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            encoding: Encoding::Protobuf,
            api_key: None,
            routes: Arc::default(),
        })
    }

    /// Uses `encoding` for request bodies and asks for it in replies (`Accept`).
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Sends `Authorization: Bearer <key>` with every call.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Uses `tls` for `https://` connections: extra trusted CAs and an optional client certificate (mutual TLS).
    /// Replaces the HTTP client (settings made with [`Client::with_http_client`] before are lost; to combine them,
    /// build the `reqwest::Client` yourself). An `http://` endpoint ignores the settings.
    ///
    /// # Errors
    /// [`ClientError::Tls`] when rustls refuses the settings (a client key that does not match its certificate).
    pub fn with_tls(mut self, tls: &TlsConfig) -> Result<Self, ClientError> {
        self.http = tls.builder().build().map_err(|e| ClientError::Tls {
            reason: error::chain(&e),
        })?;
        Ok(self)
    }

    /// Uses a caller-built `reqwest::Client` (timeouts, pool sizes, ...).
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// The encoding in use.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The endpoint, without a trailing slash.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Calls any RPC of the route table: `POST R::PATH` with `req` in the client's encoding, and the 200 reply
    /// decoded as `R::Response` (a [`Reply`](lessor_proto::Reply) for RPCs that return nothing). The typed
    /// methods below are this with the route filled in.
    ///
    /// ```no_run
    /// # async fn demo(client: &lessor_client::Client) -> Result<(), lessor_client::ClientError> {
    /// use lessor_client::routes::QueuesInfo;
    /// use lessor_proto::QueuesInfoRequest;
    ///
    /// let info = client
    ///     .call::<QueuesInfo>(&QueuesInfoRequest { queue_name: "orders".into() })
    ///     .await?;
    /// println!("{}", info.lease_timeout);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Any [`ClientError`]; the service's refusals are [`ClientError::Api`].
    pub async fn call<R: Rpc>(&self, req: &R::Request) -> Result<R::Response, ClientError> {
        let ct = self.encoding.content_type();
        let (status, reply_ct, body) = self
            .send(
                Method::POST,
                self.route(R::PATH)?,
                Some(ct),
                Some(ct),
                encode(self.encoding, req),
            )
            .await?;
        let reply_ct = reply_ct.as_ref().and_then(|v| v.to_str().ok());
        if status != StatusCode::OK {
            return Err(error::error_from_reply(status.as_u16(), reply_ct, &body));
        }
        // A 200 is decoded by its own Content-Type; a missing one means the encoding we asked for.
        let enc = match reply_ct {
            None => self.encoding,
            Some(ct) => request_encoding(Some(ct)).map_err(|_| ClientError::Http {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            })?,
        };
        decode(enc, &body).map_err(ClientError::Decode)
    }

    // ---------------------------------------------------------------------------------------------
    // Queue
    // ---------------------------------------------------------------------------------------------

    /// `POST /v1/queue.produce`: adds items to a queue.
    ///
    /// # Errors
    /// Any [`ClientError`]; the service's refusals are [`ClientError::Api`].
    pub async fn queue_produce(&self, req: &QueueProduceRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueProduce>(req).await.map(drop)
    }

    /// `POST /v1/queue.lease`: long-polls for up to `batch_size` items of one partition. When nothing
    /// arrives before `request_timeout` the service answers 454 ([`ClientError::is_retryable`]).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_lease(&self, req: &QueueLeaseRequest) -> Result<QueueLeaseResponse, ClientError> {
        self.call::<routes::QueueLease>(req).await
    }

    /// `POST /v1/queue.complete`: marks leased items done.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_complete(&self, req: &QueueCompleteRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueComplete>(req).await.map(drop)
    }

    /// `POST /v1/queue.retry`: returns leased items to the queue or dead-letters them.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_retry(&self, req: &QueueRetryRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueRetry>(req).await.map(drop)
    }

    /// `POST /v1/queue.stats`: per-partition counters of a queue.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_stats(&self, req: &QueueStatsRequest) -> Result<QueueStatsResponse, ClientError> {
        self.call::<routes::QueueStats>(req).await
    }

    /// `POST /v1/queue.clear`: removes waiting and/or scheduled items.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_clear(&self, req: &QueueClearRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueClear>(req).await.map(drop)
    }

    /// `POST /v1/queue.reload`: reloads a queue's partitions from storage.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_reload(&self, req: &QueueReloadRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueReload>(req).await.map(drop)
    }

    // ---------------------------------------------------------------------------------------------
    // Queues
    // ---------------------------------------------------------------------------------------------

    /// `POST /v1/queues.create`: creates a queue.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queues_create(&self, info: &QueueInfo) -> Result<(), ClientError> {
        self.call::<routes::QueuesCreate>(info).await.map(drop)
    }

    /// `POST /v1/queues.list`: one page of queues.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queues_list(&self, req: &QueuesListRequest) -> Result<QueuesListResponse, ClientError> {
        self.call::<routes::QueuesList>(req).await
    }

    /// `POST /v1/queues.update`: changes a queue's configuration.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queues_update(&self, info: &QueueInfo) -> Result<(), ClientError> {
        self.call::<routes::QueuesUpdate>(info).await.map(drop)
    }

    /// `POST /v1/queues.delete`: deletes a queue and its items.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queues_delete(&self, req: &QueuesDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::QueuesDelete>(req).await.map(drop)
    }

    /// `POST /v1/queues.info`: one queue's configuration.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queues_info(&self, req: &QueuesInfoRequest) -> Result<QueueInfo, ClientError> {
        self.call::<routes::QueuesInfo>(req).await
    }

    // ---------------------------------------------------------------------------------------------
    // Storage
    // ---------------------------------------------------------------------------------------------

    /// `POST /v1/storage/items.list`: raw items of one partition.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn storage_items_list(
        &self,
        req: &StorageItemsListRequest,
    ) -> Result<StorageItemsListResponse, ClientError> {
        self.call::<routes::StorageItemsList>(req).await
    }

    /// `POST /v1/storage/scheduled.list`: scheduled items of one partition.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn storage_scheduled_list(
        &self,
        req: &StorageItemsListRequest,
    ) -> Result<StorageItemsListResponse, ClientError> {
        self.call::<routes::StorageScheduledList>(req).await
    }

    /// `POST /v1/storage/items.import`: writes raw items; the reply carries their new ids.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn storage_items_import(
        &self,
        req: &StorageItemsImportRequest,
    ) -> Result<StorageItemsImportResponse, ClientError> {
        self.call::<routes::StorageItemsImport>(req).await
    }

    /// `POST /v1/storage/items.delete`: deletes raw items by id.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn storage_items_delete(&self, req: &StorageItemsDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::StorageItemsDelete>(req).await.map(drop)
    }

    // ---------------------------------------------------------------------------------------------
    // Health, metrics, raw
    // ---------------------------------------------------------------------------------------------

    /// `GET /health`: the health document (`{"status": "pass" | "fail", ...}`). A 503 whose body is a
    /// health document is returned as `Ok` too: read `status` to tell pass from fail.
    ///
    /// # Errors
    /// [`ClientError::Transport`], or [`ClientError::Http`] when the body is not JSON.
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        let (status, _headers, body) = self
            .send(Method::GET, self.route(routes::HEALTH)?, None, None, Vec::new())
            .await?;
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(doc @ serde_json::Value::Object(_))
                if status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                Ok(doc)
            }
            _ => Err(ClientError::Http {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    /// `GET /metrics`: the Prometheus text exposition.
    ///
    /// # Errors
    /// [`ClientError::Transport`], or [`ClientError::Http`] on a non-200 status.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (status, _headers, body) = self
            .send(Method::GET, self.route(routes::METRICS)?, None, None, Vec::new())
            .await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if status == StatusCode::OK {
            Ok(text)
        } else {
            Err(ClientError::Http {
                status: status.as_u16(),
                body: text,
            })
        }
    }

    /// `POST`s `body` to `path` (e.g. `"/v1/queue.produce"`) with exactly the given `Content-Type` and
    /// `Accept` and returns the reply as it is, whatever its status. Meant for tests of malformed input and
    /// content negotiation.
    ///
    /// `None` leaves `Content-Type` out. For `Accept`, the HTTP stack sends `Accept: */*` when `None` is
    /// given; DUH-RPC servers treat that exactly like a missing header (JSON).
    ///
    /// # Errors
    /// [`ClientError::Transport`] only.
    pub async fn raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: impl Into<Vec<u8>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        self.send_raw(Method::POST, path, content_type, accept, body.into())
            .await
    }

    /// Like [`Client::raw`] with any HTTP method (to test that only `POST` is allowed).
    ///
    /// # Errors
    /// [`ClientError::Transport`] only.
    pub async fn raw_with_method(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: impl Into<Vec<u8>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        self.send_raw(method, path, content_type, accept, body.into())
            .await
    }

    /// `POST /v1/storage.backup` (Lessor extension): starts a backup and returns its body, the backup file, to
    /// be read chunk by chunk with [`BackupStream::chunk`].
    ///
    /// # Errors
    /// Any [`ClientError`]; the service's refusals (before the first byte) are [`ClientError::Api`].
    pub async fn storage_backup(
        &self,
        req: &lessor_proto::StorageBackupRequest,
    ) -> Result<BackupStream, ClientError> {
        let ct = self.encoding.content_type();
        let resp = self
            .builder(
                Method::POST,
                self.route(lessor_proto::routes::STORAGE_BACKUP)?,
                Some(ct),
                Some(ct),
            )?
            .body(encode(self.encoding, req))
            .send()
            .await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let reply_ct = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.bytes().await?;
            return Err(error::error_from_reply(
                status.as_u16(),
                reply_ct.as_deref(),
                &body,
            ));
        }
        Ok(BackupStream(resp))
    }

    // ---------------------------------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------------------------------

    /// The URL of `path` on the endpoint, as text (for paths that are not one of the routes).
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.endpoint, path)
    }

    /// The URL of the route `path` on the endpoint, parsed once per client.
    fn route(&self, path: &'static str) -> Result<Url, ClientError> {
        if let Some(u) = self.routes.read().unwrap_or_else(|e| e.into_inner()).get(path) {
            return Ok(u.clone());
        }
        let u = Url::parse(&self.url(path)).map_err(|e| ClientError::InvalidEndpoint {
            endpoint: self.endpoint.clone(),
            reason: e.to_string(),
        })?;
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path, u.clone());
        Ok(u)
    }

    /// A request with the endpoint, content negotiation and the API key set.
    fn builder(
        &self,
        method: Method,
        url: impl reqwest::IntoUrl,
        content_type: Option<&str>,
        accept: Option<&str>,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let mut rb = self.http.request(method, url);
        if let Some(ct) = content_type {
            rb = rb.header(CONTENT_TYPE, ct);
        }
        if let Some(a) = accept {
            rb = rb.header(ACCEPT, a);
        }
        // This client reads Lessor's extension fields; without the header a JSON reply to a Querator route leaves
        // them out for Querator's strict decoders.
        rb = rb.header(lessor_proto::routes::EXTENSIONS_HEADER, "1");
        if let Some(key) = &self.api_key {
            let mut value =
                HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| ClientError::InvalidEndpoint {
                    endpoint: self.endpoint.clone(),
                    reason: "the API key is not a valid header value".to_string(),
                })?;
            value.set_sensitive(true);
            rb = rb.header(AUTHORIZATION, value);
        }
        Ok(rb)
    }

    /// Sends one request and reads the whole reply: its status, `Content-Type` and body.
    async fn send(
        &self,
        method: Method,
        url: impl reqwest::IntoUrl,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Option<HeaderValue>, Bytes), ClientError> {
        let rb = self.builder(method, url, content_type, accept)?;
        let resp = rb.body(body).send().await?;
        let status = resp.status();
        let content_type = resp.headers().get(CONTENT_TYPE).cloned();
        let bytes = resp.bytes().await?;
        Ok((status, content_type, bytes))
    }

    /// Sends one request to any `path` and reads the whole reply with all its headers.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        let rb = self.builder(method, self.url(path), content_type, accept)?;
        let resp = rb.body(body).send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        Ok((status, headers, bytes))
    }
}
