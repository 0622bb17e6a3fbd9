//! Routes and handlers of Querator's v1 API.
//!
//! Every RPC is `POST /v1/<resource>.<method>` with a JSON or protobuf body chosen by `Content-Type`, answered in
//! the encoding `Accept` asks for. Errors use the `{code, code_text, message, details}` envelope with the HTTP status
//! equal to the code, and Querator's code text as the reason phrase where HTTP has none (453, 454, 455). Bodies are
//! read with a per-route limit before decoding, so an oversized body costs at most the limit.
//!
//! Paths, messages and body limits come from the route table ([`lessor_proto::routes`]); this module adds one
//! handler per route (the `fn(Api) -> Api` functions below, which name their route once) and the plumbing they share
//! (`rpc`).
//!
//! # Connection hygiene
//! A request refused before its body has been read (455 for a bad `Content-Type` or `Accept`, 400 for a wrong method
//! or a body over the limit, 501 for an unknown path) still has the rest of its body read and dropped, up to the
//! route's limit plus [`DRAIN_SLACK`] in all and for at most [`DRAIN_TIME`]: the connection then serves the next
//! request, and a client still sending an oversized body can read the 400 instead of a reset. When the body is longer
//! or slower than that, or the client waits on `Expect: 100-continue` for a body nobody will read, the answer carries
//! `Connection: close`, so a pooled client never finds out on its next request.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use lessor_core::auth::memory::MemoryAuthStore;
use lessor_core::auth::{Auth, AuthError, AuthMode, Permission, Principal};
use lessor_core::engine::{Engine, RedriveTask};
use lessor_core::types::{ClearRequest, DEFAULT_NAMESPACE};
use lessor_proto::routes::{self, BodyLimit, Rpc, Target};
use lessor_proto::{self as pb, Encoding, Reply};
use serde::Serialize;

use crate::error::ApiError;
use crate::history::History;
use crate::inflight::{Charge, Inflight};
use crate::metrics::{Metrics, RouteLabels, RouteOnly};
use crate::{admin, backup, convert};

/// How far past a route's body limit the server reads (and drops) a body it refuses, so the client can read the
/// answer and reuse the connection. Bounded, so a refused upload costs at most this much more than an accepted one.
pub const DRAIN_SLACK: usize = 4 * 1024 * 1024;

/// Most repeated values (items, ids, array elements) a request body may hold, counted before it is decoded (see
/// [`pb::repeated_values`]): above the 10,000 items an import or restore page may carry, and far below what a 5 MB
/// body of empty items would decode to (2.5 million structs, about 450 MB).
pub const MAX_REQUEST_VALUES: usize = 16_384;

/// How long the server waits for the rest of a body it refuses before answering with `Connection: close`.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub(crate) engine: Engine,
    pub(crate) auth: Auth,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) history: Arc<History>,
    pub(crate) server_info: Arc<pb::ServerInfoResponse>,
    max_produce_body: usize,
    /// Produce limit of queues placed only on `offload_stores` (at least `max_produce_body`).
    max_offload_produce_body: usize,
    offload_stores: Arc<std::collections::HashSet<String>>,
    /// The server-wide bound on body bytes read and not yet answered.
    pub(crate) inflight: Arc<Inflight>,
    /// How long a client may take to send a body (`limits.body-read-timeout`).
    body_read_timeout: Duration,
}

impl AppState {
    /// State over an engine, without auth (Querator's `none` backend).
    pub fn new(engine: Engine) -> Self {
        Self::with_limits(engine, routes::DEFAULT_MAX_PRODUCE_BODY)
    }

    /// State with a produce body limit, without auth.
    pub fn with_limits(engine: Engine, max_produce_body: usize) -> Self {
        let auth = Auth::new(
            Arc::new(MemoryAuthStore::new()),
            engine.clock().clone(),
            AuthMode::Disabled,
        );
        Self::with_auth(engine, auth, max_produce_body)
    }

    /// State with an auth service and a produce body limit.
    pub fn with_auth(engine: Engine, auth: Auth, max_produce_body: usize) -> Self {
        let metrics = Arc::new(Metrics::new(engine.clone()));
        AppState {
            engine,
            auth,
            metrics,
            history: Arc::new(History::default()),
            server_info: Arc::new(pb::ServerInfoResponse::default()),
            max_produce_body,
            max_offload_produce_body: max_produce_body,
            offload_stores: Arc::default(),
            inflight: Arc::default(),
            body_read_timeout: crate::config::DEFAULT_BODY_READ_TIMEOUT,
        }
    }

    /// The same state, refusing bodies that take longer than `timeout` to arrive (`limits.body-read-timeout`).
    pub fn with_body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// A request body to be read under this state's bounds: charged to the in-flight bound, and timed.
    pub(crate) fn body(&self, body: Body, headers: &HeaderMap) -> RequestBody {
        let mut b = RequestBody::new(body, headers).charged_to(self.inflight.clone());
        b.timeout = Some(self.body_read_timeout);
        b
    }

    /// The same state, holding the bodies of requests in flight to `inflight` (`limits.max-inflight-bytes`).
    pub fn with_inflight(mut self, inflight: Inflight) -> Self {
        self.inflight = Arc::new(inflight);
        self
    }

    /// The same state, letting produce bodies up to `max` bytes through to queues whose every partition is on one
    /// of `stores` (stores that offload payloads to object storage).
    pub fn with_offload_limit(mut self, max: usize, stores: &[String]) -> Self {
        self.max_offload_produce_body = max.max(self.max_produce_body);
        self.offload_stores = Arc::new(stores.iter().cloned().collect());
        self
    }

    /// Whether a produce body of `len` bytes may go to `queue`: within `limits.max-produce-body`, or within the
    /// offload limit for a queue whose every partition offloads its payloads.
    async fn produce_body_allowed(&self, queue: &str, len: usize) -> bool {
        if len <= self.max_produce_body {
            return true;
        }
        if len > self.max_offload_produce_body || self.offload_stores.is_empty() {
            return false;
        }
        match self.engine.queue_info(queue).await {
            Ok(info) => {
                !info.partitions.is_empty()
                    && info
                        .partitions
                        .iter()
                        .all(|p| self.offload_stores.contains(&p.storage_name))
            }
            Err(_) => false,
        }
    }

    /// The same state, answering `server.info` with `info` (the version is filled in here).
    pub fn with_server_info(mut self, mut info: pb::ServerInfoResponse) -> Self {
        info.version = crate::VERSION.to_string();
        self.server_info = Arc::new(info);
        self
    }
}

/// What a handler gets besides its request: the engine, the auth service, and who is asking (already allowed to
/// call the route).
#[derive(Clone)]
pub struct Ctx {
    /// The queue engine.
    pub engine: Engine,
    /// The auth service.
    pub auth: Auth,
    /// The caller.
    pub principal: Principal,
    /// The server's metrics (for routes that count more than requests).
    pub metrics: Arc<Metrics>,
    /// The recent rates of the queues (`queue.history`).
    pub history: Arc<History>,
    /// The `server.info` answer.
    pub server_info: Arc<pb::ServerInfoResponse>,
    /// Whether the reply may carry Lessor's extension fields on a Querator route: always in protobuf (decoders skip
    /// unknown numbers), in JSON only when the request has [`routes::EXTENSIONS_HEADER`], since Querator's clients
    /// decode JSON strictly and must read replies about items and queues other clients gave a priority, a dedup
    /// window or a pause.
    pub extensions: bool,
}

/// The handler of every RPC, one per entry of [`routes::ROUTES`] (checked by a test).
const HANDLERS: [fn(Api) -> Api; 53] = [
    produce,
    lease,
    complete,
    retry,
    stats,
    clear,
    reload,
    extend,
    pause,
    resume,
    browse,
    history,
    server_info,
    queues_overview,
    auth_whoami,
    redrive_start,
    redrive_list,
    redrive_get,
    redrive_cancel,
    queues_rebalance,
    rebalance_list,
    rebalance_get,
    rebalance_cancel,
    queues_create,
    queues_list,
    queues_update,
    queues_delete,
    queues_info,
    storage_list,
    storage_scheduled,
    storage_import,
    storage_delete,
    backup::restore_begin,
    backup::restore_import,
    backup::restore_finish,
    offload_sweep,
    admin::namespaces_create,
    admin::namespaces_update,
    admin::namespaces_list,
    admin::namespaces_delete,
    admin::users_create,
    admin::users_list,
    admin::users_delete,
    admin::apikeys_create,
    admin::apikeys_list,
    admin::apikeys_delete,
    admin::roles_create,
    admin::roles_list,
    admin::roles_update,
    admin::roles_delete,
    admin::rolebindings_create,
    admin::rolebindings_list,
    admin::rolebindings_delete,
];

/// The router: RPC routes, `/health`, `/metrics`, and Querator's answers for wrong methods and unknown paths.
pub fn router(state: AppState) -> Router {
    api()
        .router
        .route(routes::HEALTH, get(health).fallback(no_such_method))
        .route(routes::METRICS, get(metrics).fallback(no_such_method))
        .route(routes::STORAGE_BACKUP, any(backup::backup))
        .fallback(no_such_method)
        .with_state(state)
}

/// The RPC routes, from [`HANDLERS`].
fn api() -> Api {
    HANDLERS.iter().fold(Api::default(), |api, add| add(api))
}

/// The RPC routes being assembled: each handler adds itself under its route's path.
#[derive(Default)]
pub(crate) struct Api {
    router: Router<AppState>,
    /// Paths added so far, to check the router against the route table.
    paths: Vec<&'static str>,
}

impl Api {
    /// Serves `R` with `handler`, which turns the decoded request into the response (or an error) on the engine.
    pub(crate) fn rpc<R, F, Fut>(mut self, _route: R, handler: F) -> Api
    where
        R: Rpc + Send + Sync + 'static,
        F: FnOnce(Ctx, R::Request) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<R::Response, ApiError>> + Send + 'static,
    {
        self.paths.push(R::PATH);
        let route = any(move |State(st): State<AppState>, req: Request| rpc::<R, F, Fut>(st, req, handler));
        self.router = self.router.route(R::PATH, route);
        self
    }
}

pub(crate) fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Writes an error envelope in the encoding the client accepts (JSON when Accept itself is the problem).
pub(crate) fn error_response(enc: Encoding, e: &ApiError) -> Response {
    let code = e.code();
    if code == 500 {
        tracing::error!(error = %e, code, "request failed");
    }
    let reply = Reply::new(i32::from(code), e.to_string());
    let mut r = encoded(
        enc,
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        &reply,
    );
    if let Some(reason) = reason_phrase(r.status()) {
        r.extensions_mut().insert(reason);
    }
    if code == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The reason phrase of a status HTTP does not name: Querator's own codes (453, 454, 455) would otherwise go out as
/// `HTTP/1.1 454 <none>`, so they carry their code text. `None` for standard codes (hyper writes those itself).
fn reason_phrase(status: StatusCode) -> Option<hyper::ext::ReasonPhrase> {
    if status.canonical_reason().is_some() {
        return None;
    }
    let text = pb::code_text(i32::from(status.as_u16()));
    if text.is_empty() {
        return None;
    }
    hyper::ext::ReasonPhrase::try_from(Bytes::from_static(text.as_bytes())).ok()
}

fn encoded<T: prost::Message + Serialize>(enc: Encoding, status: StatusCode, msg: &T) -> Response {
    let body = pb::encode(enc, msg);
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(enc.content_type()));
    r.headers_mut()
        .insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

/// Says `Connection: close` on an answer that leaves part of the request body unread: hyper closes such a
/// connection after the answer, and a client must hear it before it sends the next request on it.
pub(crate) fn closing(mut r: Response, reusable: bool) -> Response {
    if !reusable {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Routes whose body limit is above this are refused to a caller without a key before the body is read, when that
/// caller may not call them anywhere (see `rpc`).
const PRECHECK_BODY: usize = 64 * 1024;

/// Runs one RPC: method check, content negotiation, bounded body read, decode, handler, encode, metrics.
async fn rpc<R, F, Fut>(st: AppState, req: Request, handler: F) -> Response
where
    R: Rpc,
    F: FnOnce(Ctx, R::Request) -> Fut,
    Fut: Future<Output = Result<R::Response, ApiError>>,
{
    let started = Instant::now();
    // Produce bodies are read up to the larger of the two produce limits; which one applies depends on the queue,
    // known once the body is decoded.
    let limit = R::BODY_LIMIT.bytes(st.max_offload_produce_body);
    let (parts, body) = req.into_parts();
    let mut body = st.body(body, &parts.headers);
    let accept = pb::response_encoding(header_str(&parts.headers, header::ACCEPT));
    let out_enc = *accept.as_ref().unwrap_or(&Encoding::Json);
    let extensions = out_enc == Encoding::Protobuf
        || header_str(
            &parts.headers,
            header::HeaderName::from_static(routes::EXTENSIONS_HEADER),
        )
        .is_some_and(routes::extensions_requested);
    let result: Result<R::Response, ApiError> = async {
        let head = match check_head(&parts, accept) {
            Ok(enc) => authenticate(&st.auth, &parts.headers)
                .await
                .map(|principal| (enc, principal)),
            Err(e) => Err(e),
        };
        let (in_enc, principal) = match head {
            Ok(head) => head,
            Err(e) => {
                body.discard(limit).await;
                return Err(e);
            }
        };
        // The namespace a request is checked in is inside its body, so the full check comes after reading it. A
        // request without a key that could not pass in any namespace is refused first, on the routes that read
        // large bodies: otherwise any client could make the server read and decode up to 64 MB per request.
        if limit > PRECHECK_BODY
            && principal.is_anonymous()
            && !st.auth.allowed_somewhere(&principal, R::PERMISSION).await?
        {
            return Err(AuthError::Unauthenticated.into());
        }
        let bytes = body.read(limit).await?;
        if pb::repeated_values(in_enc, &bytes, MAX_REQUEST_VALUES) > MAX_REQUEST_VALUES {
            return Err(ApiError::TooManyValues(MAX_REQUEST_VALUES));
        }
        let msg: R::Request = pb::decode(in_enc, &bytes)?;
        // The decoded message holds copies of what it needs: the raw body would only double the memory a request
        // waiting in an inbox holds (its charge stays until the answer, covering the decoded items).
        let body_len = bytes.len();
        drop(bytes);
        authorize::<R>(&st, &principal, &msg).await?;
        if R::BODY_LIMIT == BodyLimit::MaxProduceBody && body_len > st.max_produce_body {
            let allowed = match R::target(&msg) {
                Target::Queue(q) => st.produce_body_allowed(q, body_len).await,
                _ => false,
            };
            if !allowed {
                return Err(ApiError::BodyTooLarge(st.max_produce_body));
            }
        }
        let ctx = Ctx {
            engine: st.engine.clone(),
            auth: st.auth.clone(),
            principal,
            metrics: st.metrics.clone(),
            history: st.history.clone(),
            server_info: st.server_info.clone(),
            extensions,
        };
        handler(ctx, msg).await
    }
    .await;
    let (response, code) = match result {
        Ok(res) => (encoded(out_enc, StatusCode::OK, &res), 200),
        Err(e) => (error_response(out_enc, &e), e.code()),
    };
    st.metrics
        .requests
        .get_or_create(&RouteLabels {
            route: R::PATH.to_string(),
            code,
        })
        .inc();
    st.metrics
        .answered
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.metrics
        .latency
        .get_or_create(&RouteOnly {
            route: R::PATH.to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    closing(response, body.reusable)
}

/// The caller, from the `Authorization` header: `Bearer <key>`, or no header for the anonymous principal. A header
/// of another shape is refused even with auth off, as Querator does.
pub(crate) async fn authenticate(auth: &Auth, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let token = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| AuthError::BadHeader)?;
            Some(v.strip_prefix("Bearer ").ok_or(AuthError::BadHeader)?)
        }
    };
    Ok(auth.authenticate(token).await?)
}

/// Whether `principal` may call `R` with `msg`, checked in the namespace the route names.
///
/// For a queue route that is the queue's namespace. A queue that does not exist has none, so the check is made in
/// `_system`: only a principal allowed system-wide hears "queue does not exist", and anyone else gets the same 403
/// whether the queue is missing or belongs to a namespace they cannot use (Querator looks the queue up first and so
/// tells anyone which queues exist).
async fn authorize<R: Rpc>(st: &AppState, principal: &Principal, msg: &R::Request) -> Result<(), ApiError> {
    if !st.auth.enabled() {
        return Ok(());
    }
    let namespace: Arc<str> = match R::target(msg) {
        // The route describes only the caller, who has authenticated already.
        Target::Caller => return Ok(()),
        Target::Queue(name) => match st.engine.queue_namespace(name).await? {
            Some(ns) => ns,
            None => DEFAULT_NAMESPACE.into(),
        },
        Target::Namespace(ns) if !ns.is_empty() => ns.into(),
        Target::Namespace(_) | Target::System => DEFAULT_NAMESPACE.into(),
    };
    Ok(st.auth.authorize(principal, &namespace, R::PERMISSION).await?)
}

/// The checks made before reading the body, in Querator's order: `Accept`, method, `Content-Type`. Returns the
/// request body's encoding.
pub(crate) fn check_head(
    parts: &axum::http::request::Parts,
    accept: Result<Encoding, pb::CodecError>,
) -> Result<Encoding, ApiError> {
    accept?;
    if parts.method != Method::POST {
        return Err(ApiError::MethodNotAllowed(parts.method.to_string()));
    }
    cross_site(&parts.headers)?;
    // curl sends form-urlencoded unless told otherwise; a form body is never valid here, so reading it as JSON
    // lets `curl -d '{...}'` work (Querator answers 455).
    let ct = header_str(&parts.headers, header::CONTENT_TYPE).filter(|ct| {
        !ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    Ok(pb::request_encoding(ct)?)
}

/// Refuses a request that a browser sent on behalf of a page of another origin.
///
/// Without a key (auth off, or an open door) a request needs no credentials, and a page of any site can make its
/// visitor's browser POST to this server without a CORS preflight when the request is "simple": no `Content-Type`,
/// or `application/x-www-form-urlencoded` (read as JSON, see [`check_head`]), and no `Authorization`. Its answer
/// stays unreadable to that page, but the call is made: `queues.delete`, `queue.clear`, `queue.produce`... No client
/// but a browser has a use for that (a page of another origin cannot send a key: that needs a preflight, which this
/// server does not answer), so browsers' own word on where a request comes from decides: `Sec-Fetch-Site` when
/// they send it (every current browser), else `Origin` against `Host`. Requests without either (curl, the Go and
/// Rust clients) and the dashboard's own (same origin) are served as before.
fn cross_site(headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(site) = header_str(headers, header::HeaderName::from_static("sec-fetch-site")) {
        return match site.trim().to_ascii_lowercase().as_str() {
            // `none`: typed by the user (address bar, bookmark); never a POST, but not forged either.
            "same-origin" | "none" => Ok(()),
            _ => Err(ApiError::CrossSite(site.trim().to_string())),
        };
    }
    let Some(origin) = header_str(headers, header::ORIGIN) else {
        return Ok(());
    };
    // `scheme://host[:port]` (or `null`); its authority must be the one the request was sent to.
    let authority = origin.split_once("://").map(|(_, a)| a.trim_end_matches('/'));
    let host = header_str(headers, header::HOST);
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()) => Ok(()),
        _ => Err(ApiError::CrossSite(origin.to_string())),
    }
}

/// A request body being read, with what the connection needs to know afterwards.
pub(crate) struct RequestBody {
    body: Body,
    /// `Content-Length`, when the client sent one.
    declared: Option<usize>,
    /// The client sent `Expect: 100-continue`: it waits for a go-ahead (sent by hyper on the first read) before
    /// sending the body.
    expects_continue: bool,
    /// Bytes read so far.
    read: usize,
    /// Whether the body has been polled at all (after which hyper has sent `100 Continue` if it was asked for).
    polled: bool,
    /// Whether the connection can serve another request: false once part of the body is left unread.
    pub(crate) reusable: bool,
    /// Where the bytes read are charged (`limits.max-inflight-bytes`); `None`: not charged (bodies only drained).
    gate: Option<Arc<Inflight>>,
    /// What this request holds of that bound, until it is dropped with the request.
    charge: Charge,
    /// How long [`RequestBody::read`] waits for the whole body (`limits.body-read-timeout`); `None`: unbounded
    /// (only for bodies drained, which [`DRAIN_TIME`] bounds).
    timeout: Option<Duration>,
}

impl RequestBody {
    pub(crate) fn new(body: Body, headers: &HeaderMap) -> Self {
        let declared = header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok());
        let expects_continue = header_str(headers, header::EXPECT)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
        RequestBody {
            body,
            declared,
            expects_continue,
            read: 0,
            polled: false,
            reusable: true,
            gate: None,
            charge: Charge::default(),
            timeout: None,
        }
    }

    /// The same body, its bytes charged to `gate` as they are read (and the declared length before reading).
    pub(crate) fn charged_to(mut self, gate: Arc<Inflight>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Charges `total` bytes read (or about to be) to the gate; refuses (and drains) the body when no room comes.
    async fn cover(&mut self, total: usize, limit: usize) -> Result<(), ApiError> {
        let Some(gate) = self.gate.clone() else {
            return Ok(());
        };
        if let Err(e) = gate.cover(&mut self.charge, total).await {
            self.discard(limit).await;
            return Err(e);
        }
        Ok(())
    }

    /// The next chunk of data; `None` at the end.
    async fn next(&mut self) -> Option<Result<Bytes, ApiError>> {
        self.polled = true;
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    // Trailers carry no data; skip them.
                    if let Ok(data) = frame.into_data() {
                        self.read = self.read.saturating_add(data.len());
                        return Some(Ok(data));
                    }
                }
                Err(e) => {
                    self.reusable = false;
                    return Some(Err(ApiError::BodyRead(e.to_string())));
                }
            }
        }
    }

    /// The whole body, refused over `limit` bytes (the rest is then discarded, see [`RequestBody::discard`]).
    pub(crate) async fn read(&mut self, limit: usize) -> Result<Bytes, ApiError> {
        // A declared length over the limit is refused before reading anything: a client waiting on
        // `Expect: 100-continue` is then told without sending its body.
        if self.declared.is_some_and(|n| n > limit) {
            self.discard(limit).await;
            return Err(ApiError::BodyTooLarge(limit));
        }
        // A declared length is charged before anything is read: a body that cannot fit is refused without being
        // held, and a client waiting on `Expect: 100-continue` is told before it sends. The minimum (one unit) is
        // charged for a body of unknown length, and more as it arrives.
        self.cover(self.declared.unwrap_or(0), limit).await?;
        // The body-read timeout counts from here: waiting for room above is the server's doing, not the client's.
        // A client that trickles its body (a byte a second keeps any per-read timeout happy) would otherwise hold
        // its request, its connection and its share of the in-flight bound for as long as it likes.
        let deadline = self.timeout.map(|t| (tokio::time::Instant::now() + t, t));
        // One chunk is the common case: keep it as it is rather than copying it.
        let mut first: Option<Bytes> = None;
        let mut rest = BytesMut::new();
        loop {
            let chunk = match deadline {
                None => self.next().await,
                Some((at, t)) => match tokio::time::timeout_at(at, self.next()).await {
                    Ok(c) => c,
                    Err(_) => {
                        // The rest of the body is not coming in time: not worth draining either.
                        self.reusable = false;
                        return Err(ApiError::BodyRead(format!(
                            "not received within {t:?} (limits.body-read-timeout)"
                        )));
                    }
                },
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk?;
            if self.read > limit {
                self.discard(limit).await;
                return Err(ApiError::BodyTooLarge(limit));
            }
            self.cover(self.read, limit).await?;
            match &first {
                None => first = Some(chunk),
                Some(f) => {
                    if rest.is_empty() {
                        rest.extend_from_slice(f);
                    }
                    rest.extend_from_slice(&chunk);
                }
            }
        }
        Ok(if rest.is_empty() {
            first.unwrap_or_default()
        } else {
            rest.freeze()
        })
    }

    /// Reads and drops the rest of a body the server will not use, so the connection can serve the next request,
    /// within `limit + DRAIN_SLACK` bytes in all and [`DRAIN_TIME`]. Gives up (marking the connection not reusable)
    /// beyond those, or when the client still waits for `100 Continue`: asking for a body only to drop it is
    /// pointless, and the client sends nothing once it has the answer.
    pub(crate) async fn discard(&mut self, limit: usize) {
        if self.body.is_end_stream() {
            return;
        }
        let budget = limit.saturating_add(DRAIN_SLACK);
        if (self.expects_continue && !self.polled) || self.declared.is_some_and(|n| n > budget) {
            self.reusable = false;
            return;
        }
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(chunk) = self.next().await {
                if chunk.is_err() || self.read > budget {
                    return false;
                }
            }
            true
        })
        .await;
        if drained != Ok(true) {
            self.reusable = false;
        }
    }
}

/// Querator's answer to a request no route takes: any method but `POST` is 400 (`GET /health` and `GET /metrics`
/// have routes of their own), and a `POST` to a path without an RPC, `/health` and `/metrics` included, is 501; both
/// in the reply envelope, which is what a DUH client decodes.
async fn no_such_method(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut body = RequestBody::new(body, &parts.headers);
    body.discard(0).await;
    let enc = pb::response_encoding(header_str(&parts.headers, header::ACCEPT)).unwrap_or(Encoding::Json);
    let r = if parts.method != Method::POST {
        error_response(enc, &ApiError::MethodNotAllowed(parts.method.to_string()))
    } else {
        error_response(enc, &ApiError::NoSuchMethod(parts.uri.path().to_string()))
    };
    closing(r, body.reusable)
}

fn ok() -> Reply {
    Reply::ok()
}

// ---- queue ---------------------------------------------------------------------------------------------------

fn produce(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueProduce,
        |Ctx { engine: e, .. }, r: pb::QueueProduceRequest| async move {
            let timeout = convert::duration("request timeout", &r.request_timeout)?;
            e.produce(&r.queue_name, convert::produce_items(r.items)?, timeout)
                .await?;
            Ok(ok())
        },
    )
}

fn lease(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueLease,
        |Ctx {
             engine: e,
             extensions,
             ..
         },
         r: pb::QueueLeaseRequest| async move {
            let timeout = convert::duration("request timeout", &r.request_timeout)?;
            let res = e
                .lease(
                    &r.queue_name,
                    convert::batch_size(r.batch_size),
                    &r.client_id,
                    timeout,
                )
                .await?;
            Ok(pb::QueueLeaseResponse {
                queue_name: r.queue_name,
                partition: i32::try_from(res.partition).unwrap_or(i32::MAX),
                items: res
                    .items
                    .into_iter()
                    .map(|i| {
                        convert::view(
                            convert::lease_item(i),
                            extensions,
                            pb::QueueLeaseItem::clear_extensions,
                        )
                    })
                    .collect(),
            })
        },
    )
}

/// A parsed partition number or id list, or, when it does not parse, the first problem in Querator's order: a
/// missing queue, then a partition the queue does not have, then the value itself.
async fn after_target<T>(
    engine: &Engine,
    queue: &str,
    partition: i32,
    parsed: Result<T, ApiError>,
) -> Result<T, ApiError> {
    match parsed {
        Ok(v) => Ok(v),
        Err(e) => {
            engine.check_target(queue, i64::from(partition)).await?;
            Err(e)
        }
    }
}

fn complete(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueComplete,
        |Ctx { engine: e, .. }, r: pb::QueueCompleteRequest| async move {
            let timeout = convert::duration("request timeout", &r.request_timeout)?;
            let ids = after_target(&e, &r.queue_name, r.partition, convert::item_ids(&r.ids)).await?;
            let partition =
                after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
            e.complete(&r.queue_name, partition, ids, timeout).await?;
            Ok(ok())
        },
    )
}

fn retry(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueRetry,
        |Ctx { engine: e, .. }, r: pb::QueueRetryRequest| async move {
            let items = after_target(&e, &r.queue_name, r.partition, convert::retry_items(r.items)).await?;
            let partition =
                after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
            e.retry(&r.queue_name, partition, items).await?;
            Ok(ok())
        },
    )
}

fn stats(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueStats,
        |Ctx { engine: e, .. }, r: pb::QueueStatsRequest| async move {
            let s = e.stats(&r.queue_name).await?;
            Ok(convert::stats_out(
                r.queue_name,
                s,
                r.with_oldest_age,
                r.with_tiers,
            ))
        },
    )
}

/// `offload.sweep`: the sweeper of orphaned payload objects, now (see `Engine::sweep_objects`).
fn offload_sweep(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::OffloadSweep,
        |Ctx { engine: e, .. }, r: pb::OffloadSweepRequest| async move {
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let stores = e
                .sweep_objects(&r.store)
                .await?
                .into_iter()
                .map(|(store, o)| pb::OffloadSweepStore {
                    store,
                    listed: n(o.listed),
                    deleted: n(o.deleted),
                    spared: n(o.listed.saturating_sub(o.deleted)),
                    not_open: n(o.skipped),
                })
                .collect();
            Ok(pb::OffloadSweepResponse { stores })
        },
    )
}

fn clear(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueClear,
        |Ctx { engine: e, .. }, r: pb::QueueClearRequest| async move {
            let c = ClearRequest {
                queue: r.queue,
                scheduled: r.scheduled,
                destructive: r.destructive,
            };
            e.clear(&r.queue_name, c).await?;
            Ok(ok())
        },
    )
}

fn reload(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueReload,
        |Ctx { engine: e, .. }, r: pb::QueueReloadRequest| async move {
            e.reload(&r.queue_name).await?;
            Ok(ok())
        },
    )
}

// ---- Lessor extensions ---------------------------------------------------------------------------------------

fn extend(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueExtend,
        |Ctx { engine: e, .. }, r: pb::QueueExtendRequest| async move {
            let timeout = convert::duration("request timeout", &r.request_timeout)?;
            let lease = convert::duration("lease_timeout", &r.lease_timeout)?;
            let ids = after_target(&e, &r.queue_name, r.partition, convert::item_ids(&r.ids)).await?;
            let partition =
                after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
            e.extend(&r.queue_name, partition, ids, lease, timeout).await?;
            Ok(ok())
        },
    )
}

fn pause(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuePause,
        |Ctx { engine: e, .. }, r: pb::QueuePauseRequest| async move {
            e.set_paused(&r.queue_name, true).await?;
            Ok(ok())
        },
    )
}

fn resume(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueResume,
        |Ctx { engine: e, .. }, r: pb::QueueResumeRequest| async move {
            e.set_paused(&r.queue_name, false).await?;
            Ok(ok())
        },
    )
}

fn browse(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueBrowse,
        |Ctx { engine: e, .. }, r: pb::QueueBrowseRequest| async move {
            let partition =
                after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
            let req = after_target(
                &e,
                &r.queue_name,
                r.partition,
                convert::browse_request(&r, partition),
            )
            .await?;
            let scheduled = req.state == lessor_core::engine::BrowseState::Scheduled;
            let page = e.browse(&r.queue_name, req).await?;
            Ok(convert::browse_out(page, scheduled))
        },
    )
}

fn history(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueHistory,
        |Ctx {
             engine: e, history, ..
         },
         r: pb::QueueHistoryRequest| async move {
            // The same "queue does not exist" as queue.stats for a name that is not a queue.
            e.queue_namespace(&r.queue_name)
                .await?
                .ok_or_else(|| lessor_core::error::QueueError::QueueNotFound(r.queue_name.clone()))?;
            Ok(pb::QueueHistoryResponse {
                interval_ms: i64::try_from(crate::history::INTERVAL.as_millis()).unwrap_or(i64::MAX),
                samples: history.samples(&r.queue_name),
            })
        },
    )
}

fn server_info(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::ServerInfo,
        |Ctx { server_info, .. }, _r: pb::ServerInfoRequest| async move { Ok((*server_info).clone()) },
    )
}

fn queues_overview(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesOverview,
        |Ctx {
             engine: e,
             auth,
             principal,
             history,
             ..
         },
         r: pb::QueuesOverviewRequest| async move {
            let limit = convert::list_limit(r.limit)?;
            // Each row costs a `queue.stats`: a page stays a page.
            if limit > OVERVIEW_MAX {
                return Err(lessor_core::validate::invalid(
                    "limit",
                    format!("cannot be greater than '{OVERVIEW_MAX}'"),
                )
                .into());
            }
            let ns = if r.namespace.is_empty() {
                DEFAULT_NAMESPACE.to_string()
            } else {
                r.namespace
            };
            // One more than the page, to know where the next page starts (a page cut short by its partitions
            // goes on after its last queue).
            let page = e.list_queues(&r.pivot, limit.saturating_add(1), &ns).await?;
            let mut queues = page.queues;
            let next_pivot = if queues.len() > limit {
                queues.pop().map(|q| q.name).unwrap_or_default()
            } else if page.more {
                queues.last().map(|q| format!("{}\0", q.name)).unwrap_or_default()
            } else {
                String::new()
            };
            // The route needs `queue.list`, as `queues.list`; the figures are what `queue.stats` shows, so they
            // need that too (every queue of the page is in `ns`).
            let figures = auth.allowed(&principal, &ns, Permission::QueueStats).await?;
            let rows = queues.into_iter().map(|q| {
                let (e, history) = (&e, &history);
                async move { overview_row(e, history, q, figures).await }
            });
            // A few queues at a time, in order: their stats run in parallel without a page of a thousand queues
            // asking for a thousand storage reads at once.
            let mut items: Vec<pb::QueueOverview> = futures::StreamExt::collect(
                futures::StreamExt::buffered(futures::stream::iter(rows), OVERVIEW_PARALLEL),
            )
            .await;
            if figures {
                dead_depths(&e, &auth, &principal, &mut items).await;
            }
            Ok(pb::QueuesOverviewResponse { items, next_pivot })
        },
    )
}

/// Most queues in one `queues.overview` page.
pub const OVERVIEW_MAX: usize = 1000;

/// Rows of a `queues.overview` page whose stats are read at the same time.
const OVERVIEW_PARALLEL: usize = 16;

/// One queue of `queues.overview`: its definition's name, namespace, dead-letter queue and pause state, and with
/// `figures` its depths, rates and oldest age. A queue whose stats fail keeps its row, with the error.
async fn overview_row(
    e: &Engine,
    history: &History,
    q: lessor_core::types::QueueInfo,
    figures: bool,
) -> pb::QueueOverview {
    let mut row = pb::QueueOverview {
        queue_name: q.name,
        namespace: q.namespace,
        dead_queue: q.dead_queue,
        paused: q.paused,
        ..Default::default()
    };
    if !figures {
        row.stats_hidden = true;
        return row;
    }
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match e.stats(&row.queue_name).await {
        Ok(s) => {
            let mut oldest = std::time::Duration::ZERO;
            let mut tiers = lessor_core::types::TierStats::default();
            for p in &s.partitions {
                row.ready += n(p.total.saturating_sub(p.total_leased));
                row.leased += n(p.total_leased);
                row.scheduled += n(p.scheduled);
                oldest = oldest.max(p.oldest_ready_age);
                tiers.add(&p.tiers);
            }
            row.tiers = Some(convert::tiers_out(&tiers));
            if !oldest.is_zero() {
                row.oldest_ready_age = lessor_proto::duration::format_go_duration(oldest);
            }
        }
        Err(err) => row.error = ApiError::from(err).to_string(),
    }
    let r = history.rates(&row.queue_name, crate::history::RATE_SAMPLES);
    (row.produce_rate, row.lease_rate, row.complete_rate) = (r.produced, r.leased, r.completed);
    row
}

/// Fills the dead-letter depth of the rows that name a dead-letter queue, each queue looked at once (several queues
/// often share one): from its own row when it is on the page, otherwise from its stats when the caller may read
/// them (it may be in another namespace; otherwise the depth is left out).
async fn dead_depths(e: &Engine, auth: &Auth, principal: &Principal, rows: &mut [pb::QueueOverview]) {
    let mut depth: std::collections::HashMap<String, i64> = rows
        .iter()
        .filter(|r| r.error.is_empty())
        .map(|r| (r.queue_name.clone(), r.ready + r.leased + r.scheduled))
        .collect();
    let wanted: std::collections::BTreeSet<String> = rows
        .iter()
        .filter(|r| !r.dead_queue.is_empty() && !depth.contains_key(&r.dead_queue))
        .map(|r| r.dead_queue.clone())
        .collect();
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for dlq in wanted {
        let readable = match e.queue_namespace(&dlq).await {
            Ok(Some(ns)) => auth
                .allowed(principal, &ns, Permission::QueueStats)
                .await
                .unwrap_or(false),
            _ => false,
        };
        if !readable {
            continue;
        }
        if let Ok(s) = e.stats(&dlq).await {
            depth.insert(
                dlq,
                s.partitions.iter().map(|p| n(p.total) + n(p.scheduled)).sum(),
            );
        }
    }
    for r in rows.iter_mut() {
        if let Some(d) = depth.get(&r.dead_queue) {
            r.dead_depth = *d;
        }
    }
}

fn auth_whoami(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::AuthWhoami,
        |Ctx { auth, principal, .. }, _r: pb::AuthWhoamiRequest| async move {
            if !auth.enabled() {
                return Ok(pb::AuthWhoamiResponse::default());
            }
            let grants = auth.grants(&principal.user_id).await.map_err(|e| {
                tracing::warn!(user = %principal.user_id, error = %e, "authorization check failed");
                AuthError::CheckFailed
            })?;
            let scope = principal.namespace_scope.as_str();
            let namespaces = grants
                .namespaces()
                .into_iter()
                // A scoped key uses only its scope's bindings and `_system`'s (see `Auth::allowed`).
                .filter(|(ns, _)| scope.is_empty() || *ns == scope || *ns == DEFAULT_NAMESPACE)
                .map(|(ns, perms)| pb::NamespacePermissions {
                    namespace: ns.to_string(),
                    permissions: perms.names(),
                })
                .collect();
            Ok(pb::AuthWhoamiResponse {
                auth_enabled: true,
                user_id: principal.user_id,
                username: principal.username,
                key_id: principal.key_id,
                namespace_scope: principal.namespace_scope,
                namespaces,
            })
        },
    )
}

fn redrive_start(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueueRedrive,
        |Ctx {
             engine: e,
             auth,
             principal,
             ..
         },
         r: pb::QueueRedriveRequest| async move {
            // The route checks `queue.update` on the dead-letter queue. Moving items into a named queue is also a
            // produce there, which may be another namespace's queue: the caller must be allowed that too. (Items
            // going back to their own source queues return where that queue's owner chose to dead-letter them.)
            if auth.enabled() && !r.target_queue.is_empty() {
                let ns: Arc<str> = e
                    .queue_namespace(&r.target_queue)
                    .await?
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
                auth.authorize(&principal, &ns, Permission::QueueProduce).await?;
            }
            let task = e.redrive_start(convert::redrive_request(r)?).await?;
            Ok(convert::redrive_out(task))
        },
    )
}

fn redrive_list(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::RedriveList,
        |Ctx { engine: e, .. }, r: pb::RedriveListRequest| async move {
            let tasks = e.redrive_list(&r.dead_queue).await?;
            Ok(pb::RedriveListResponse {
                items: tasks.into_iter().map(convert::redrive_out).collect(),
            })
        },
    )
}

/// The task `r` names, when it belongs to the dead-letter queue `r` names (if any): the permission was checked in
/// that queue's namespace, so a task of another queue must look exactly like one that does not exist.
async fn named_task(e: &Engine, r: &pb::RedriveTaskRequest) -> Result<RedriveTask, ApiError> {
    if r.task_id.is_empty() {
        return Err(lessor_core::validate::invalid("task_id", "cannot be empty").into());
    }
    let task = e.redrive_get(&r.task_id).await?;
    if !r.dead_queue.is_empty() && task.request.dead_queue != r.dead_queue {
        return Err(
            lessor_core::validate::invalid("task_id", format!("no redrive task '{}'", r.task_id)).into(),
        );
    }
    Ok(task)
}

fn redrive_get(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::RedriveGet,
        |Ctx { engine: e, .. }, r: pb::RedriveTaskRequest| async move {
            Ok(convert::redrive_out(named_task(&e, &r).await?))
        },
    )
}

fn redrive_cancel(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::RedriveCancel,
        |Ctx { engine: e, .. }, r: pb::RedriveTaskRequest| async move {
            named_task(&e, &r).await?;
            Ok(convert::redrive_out(e.redrive_cancel(&r.task_id).await?))
        },
    )
}

fn queues_rebalance(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesRebalance,
        |Ctx { engine: e, .. }, r: pb::QueueRebalanceRequest| async move {
            let task = e.rebalance_start(convert::rebalance_request(r)?).await?;
            Ok(convert::rebalance_out(task))
        },
    )
}

fn rebalance_list(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::RebalanceList,
        |Ctx { engine: e, .. }, r: pb::RebalanceListRequest| async move {
            let tasks = e.rebalance_list(&r.queue_name).await?;
            Ok(pb::RebalanceListResponse {
                items: tasks.into_iter().map(convert::rebalance_out).collect(),
            })
        },
    )
}

/// The rebalance task a request names, checked against the queue it names (the permission was checked in that
/// queue's namespace: another queue's task is "not found").
async fn named_rebalance(
    e: &lessor_core::engine::Engine,
    r: &pb::RebalanceTaskRequest,
) -> Result<lessor_core::engine::RebalanceTask, ApiError> {
    if r.task_id.is_empty() {
        return Err(lessor_core::validate::invalid("task_id", "cannot be empty").into());
    }
    let task = e.rebalance_get(&r.task_id).await?;
    if !r.queue_name.is_empty() && task.queue != r.queue_name {
        return Err(
            lessor_core::validate::invalid("task_id", format!("no rebalance task '{}'", r.task_id)).into(),
        );
    }
    Ok(task)
}

fn rebalance_get(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::RebalanceGet,
        |Ctx { engine: e, .. }, r: pb::RebalanceTaskRequest| async move {
            Ok(convert::rebalance_out(named_rebalance(&e, &r).await?))
        },
    )
}

fn rebalance_cancel(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::RebalanceCancel,
        |Ctx { engine: e, .. }, r: pb::RebalanceTaskRequest| async move {
            named_rebalance(&e, &r).await?;
            Ok(convert::rebalance_out(e.rebalance_cancel(&r.task_id).await?))
        },
    )
}

// ---- queues --------------------------------------------------------------------------------------------------

/// With auth on, the dead-letter queue a queue names must be one the caller may produce into: dead-lettering
/// writes into it on the queue's behalf with no further check (a queue in one namespace could otherwise name
/// another tenant's queue and inject items into it). Checked as any queue route is: in the queue's namespace, in
/// `_system` when it does not exist.
pub(crate) async fn authorize_dead_queue(
    engine: &Engine,
    auth: &Auth,
    principal: &Principal,
    dead_queue: &str,
) -> Result<(), ApiError> {
    if !auth.enabled() || dead_queue.is_empty() {
        return Ok(());
    }
    let ns = engine.queue_namespace(dead_queue).await?;
    let ns = ns.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    Ok(auth.authorize(principal, ns, Permission::QueueProduce).await?)
}

fn queues_create(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesCreate,
        |Ctx {
             engine: e,
             auth,
             principal,
             ..
         },
         r: pb::QueueInfo| async move {
            authorize_dead_queue(&e, &auth, &principal, &r.dead_queue).await?;
            let info = convert::queue_info_in(r)?;
            // With auth on, a queue belongs to a namespace that exists: roles and bindings can then govern it,
            // and deleting the namespace sees it.
            if auth.enabled() && !auth.namespace_exists(&info.namespace).await? {
                return Err(AuthError::NotFound(format!(
                    "namespace does not exist; '{}' was not found",
                    info.namespace
                ))
                .into());
            }
            e.create_queue(info).await?;
            Ok(ok())
        },
    )
}

fn queues_list(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesList,
        |Ctx {
             engine: e,
             extensions,
             ..
         },
         r: pb::QueuesListRequest| async move {
            let limit = convert::list_limit(r.limit)?;
            let ns = if r.namespace.is_empty() {
                DEFAULT_NAMESPACE.to_string()
            } else {
                r.namespace
            };
            // A page may hold fewer than `limit` queues before the end when they name many partitions
            // (compatibility.md): clients page on until an empty page.
            let qs = e.list_queues(&r.pivot, limit, &ns).await?.queues;
            Ok(pb::QueuesListResponse {
                items: qs
                    .into_iter()
                    .map(|q| {
                        convert::view(
                            convert::queue_info_out(q),
                            extensions,
                            pb::QueueInfo::clear_extensions,
                        )
                    })
                    .collect(),
            })
        },
    )
}

fn queues_update(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesUpdate,
        |Ctx {
             engine: e,
             auth,
             principal,
             ..
         },
         r: pb::QueueInfo| async move {
            authorize_dead_queue(&e, &auth, &principal, &r.dead_queue).await?;
            e.update_queue(convert::queue_update(r)?).await?;
            Ok(ok())
        },
    )
}

fn queues_delete(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesDelete,
        |Ctx { engine: e, .. }, r: pb::QueuesDeleteRequest| async move {
            e.delete_queue_with(&r.queue_name, r.force).await?;
            Ok(ok())
        },
    )
}

fn queues_info(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::QueuesInfo,
        |Ctx {
             engine: e,
             extensions,
             ..
         },
         r: pb::QueuesInfoRequest| async move {
            Ok(convert::view(
                convert::queue_info_out(e.queue_info(&r.queue_name).await?),
                extensions,
                pb::QueueInfo::clear_extensions,
            ))
        },
    )
}

// ---- storage -------------------------------------------------------------------------------------------------

fn storage_list(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageItemsList,
        |Ctx {
             engine: e,
             extensions,
             ..
         },
         r: pb::StorageItemsListRequest| async move { list_page(e, extensions, r, false).await },
    )
}

/// A page of `storage/items.list` (`scheduled` false: ready and leased items) or `storage/scheduled.list`.
async fn list_page(
    e: Engine,
    extensions: bool,
    r: pb::StorageItemsListRequest,
    scheduled: bool,
) -> Result<pb::StorageItemsListResponse, ApiError> {
    let limit = convert::list_limit(r.limit)?;
    let pivot = convert::pivot(&r.pivot)?;
    let partition = after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
    let items = e
        .storage_list(&r.queue_name, partition, pivot, limit, scheduled)
        .await?;
    Ok(pb::StorageItemsListResponse {
        items: items
            .into_iter()
            .map(|i| {
                convert::view(
                    convert::storage_item(i),
                    extensions,
                    pb::StorageItem::clear_extensions,
                )
            })
            .collect(),
    })
}

fn storage_scheduled(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageScheduledList,
        |Ctx {
             engine: e,
             extensions,
             ..
         },
         r: pb::StorageItemsListRequest| async move { list_page(e, extensions, r, true).await },
    )
}

fn storage_import(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageItemsImport,
        |Ctx {
             engine: e,
             extensions,
             ..
         },
         r: pb::StorageItemsImportRequest| async move {
            let items = convert::import_items(r.items)?;
            let partition =
                after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
            let out = e.storage_import(&r.queue_name, partition, items).await?;
            Ok(pb::StorageItemsImportResponse {
                items: out
                    .into_iter()
                    .map(|i| {
                        convert::view(
                            convert::storage_item(i),
                            extensions,
                            pb::StorageItem::clear_extensions,
                        )
                    })
                    .collect(),
            })
        },
    )
}

fn storage_delete(api: Api) -> Api {
    api.rpc(
        lessor_proto::routes::StorageItemsDelete,
        |Ctx { engine: e, .. }, r: pb::StorageItemsDeleteRequest| async move {
            let ids = after_target(&e, &r.queue_name, r.partition, convert::item_ids(&r.ids)).await?;
            let partition =
                after_target(&e, &r.queue_name, r.partition, convert::partition(r.partition)).await?;
            e.storage_delete(&r.queue_name, partition, ids).await?;
            Ok(ok())
        },
    )
}

// ---- health and metrics ----------------------------------------------------------------------------------------

async fn health(State(st): State<AppState>) -> Response {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let probe = tokio::time::timeout(std::time::Duration::from_secs(5), st.engine.health()).await;
    let (status, check) = match probe {
        Ok(Ok(())) => (
            "pass",
            serde_json::json!({"componentType": "datastore", "status": "pass", "time": now}),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check failed");
            (
                "fail",
                serde_json::json!({"componentType": "datastore", "status": "fail", "time": now, "output": "storage check failed"}),
            )
        }
        Err(_) => (
            "fail",
            serde_json::json!({"componentType": "datastore", "status": "fail", "time": now, "output": "storage check timed out"}),
        ),
    };
    let body = serde_json::json!({
        "status": status,
        "version": crate::VERSION,
        "checks": { "queues:storage": [check] },
    });
    let code = if status == "pass" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = (code, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/health+json"),
    );
    r
}

/// `/metrics`: Prometheus text format 0.0.4 (as Querator), or OpenMetrics when the scraper's `Accept` asks for it
/// (Prometheus does when its scrape protocols allow). With `queue=NAME` parameters (repeatable, at most
/// [`crate::metrics::MAX_NAMED_QUEUES`]), only the named queues' series and the queue totals, whatever
/// `limits.metrics-max-queues` reports; other parameters are ignored, as they always were.
async fn metrics(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let named: Vec<String> = params
        .into_iter()
        .filter(|(k, _)| k == "queue")
        .map(|(_, v)| v)
        .collect();
    if named.len() > crate::metrics::MAX_NAMED_QUEUES {
        // The envelope every other refusal of this server carries, so a client reads `code` and `message` as it
        // does elsewhere; JSON unless protobuf is asked for (a scraper's Accept names neither).
        let enc = pb::response_encoding(header_str(&headers, header::ACCEPT)).unwrap_or(Encoding::Json);
        let e = ApiError::Queue(lessor_core::error::QueueError::Invalid(format!(
            "at most {} queue parameters per /metrics request, got {}",
            crate::metrics::MAX_NAMED_QUEUES,
            named.len()
        )));
        return error_response(enc, &e);
    }
    let openmetrics = header_str(&headers, header::ACCEPT)
        .is_some_and(|a| a.to_ascii_lowercase().contains("application/openmetrics-text"));
    let om = if named.is_empty() {
        st.metrics.render()
    } else {
        st.metrics.render_queues(named)
    };
    let (body, content_type) = if openmetrics {
        (om, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        (
            crate::metrics::openmetrics_to_text(&om),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router serves every route of the table, once, and nothing else: a route added to the table without a
    /// handler (or the reverse) fails here rather than answering 501 in production.
    #[test]
    fn every_route_of_the_table_has_one_handler() {
        let mut served = api().paths;
        served.sort_unstable();
        let mut table: Vec<&str> = routes::ROUTES.iter().map(|r| r.path).collect();
        table.sort_unstable();
        assert_eq!(served, table);
    }

    #[test]
    fn querator_codes_get_their_reason_phrase() {
        let phrase = |code: u16| {
            let status = StatusCode::from_u16(code).expect("valid status");
            reason_phrase(status).map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
        };
        assert_eq!(phrase(453).as_deref(), Some("Request Failed"));
        assert_eq!(phrase(454).as_deref(), Some("Retry Request"));
        assert_eq!(phrase(455).as_deref(), Some("Client Content Error"));
        // Standard codes keep hyper's canonical phrase; unknown ones have none to give.
        assert_eq!(phrase(400), None);
        assert_eq!(phrase(599), None);
    }
}
