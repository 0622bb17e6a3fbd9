//! Routes and handlers of Querator's v1 API.
//!
//! Every RPC is `POST /v1/<resource>.<method>` with a JSON or protobuf body chosen by `Content-Type`, answered in
//! the encoding `Accept` asks for. Errors use the `{code, code_text, message, details}` envelope with the HTTP status
//! equal to the code. Bodies are read with a per-route limit before decoding, so an oversized body costs at most the
//! limit.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use http_body_util::BodyExt;
use lessor_core::engine::Engine;
use lessor_core::types::{ClearRequest, DEFAULT_NAMESPACE};
use lessor_proto::{self as pb, Encoding, Reply};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::convert;
use crate::error::ApiError;
use crate::metrics::{Metrics, RouteLabels, RouteOnly};

/// Body limits (bytes, SI units as Querator's). Querator's lease/stats/clear/reload limit is 512 B, which a long queue name in JSON can
/// exceed; 4 KB keeps the protection without rejecting valid requests.
const SMALL: usize = 4 * 1024;
const DEFAULT: usize = 256 * 1000;
const UPDATE: usize = 512 * 1000;
const IMPORT: usize = 64 * 1000 * 1000;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    engine: Engine,
    metrics: Arc<Metrics>,
    max_produce_body: usize,
}

impl AppState {
    /// State over an engine.
    pub fn new(engine: Engine) -> Self {
        Self::with_limits(engine, 5_000_000)
    }

    /// State with a produce body limit.
    pub fn with_limits(engine: Engine, max_produce_body: usize) -> Self {
        let metrics = Arc::new(Metrics::new(engine.clone()));
        AppState {
            engine,
            metrics,
            max_produce_body,
        }
    }
}

/// The router: RPC routes, `/health`, `/metrics`, and Querator's answers for wrong methods and unknown paths.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/queue.produce", any(produce))
        .route("/v1/queue.lease", any(lease))
        .route("/v1/queue.complete", any(complete))
        .route("/v1/queue.retry", any(retry))
        .route("/v1/queue.stats", any(stats))
        .route("/v1/queue.clear", any(clear))
        .route("/v1/queue.reload", any(reload))
        .route("/v1/queues.create", any(queues_create))
        .route("/v1/queues.list", any(queues_list))
        .route("/v1/queues.update", any(queues_update))
        .route("/v1/queues.delete", any(queues_delete))
        .route("/v1/queues.info", any(queues_info))
        .route("/v1/storage/items.list", any(storage_list))
        .route("/v1/storage/scheduled.list", any(storage_scheduled))
        .route("/v1/storage/items.import", any(storage_import))
        .route("/v1/storage/items.delete", any(storage_delete))
        .fallback(no_such_method)
        .with_state(state)
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Writes an error envelope in the encoding the client accepts (JSON when Accept itself is the problem).
fn error_response(enc: Encoding, e: &ApiError) -> Response {
    let code = e.code();
    if code == 500 {
        tracing::error!(error = %e, code, "request failed");
    }
    let reply = Reply::new(i32::from(code), e.to_string());
    encoded(
        enc,
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        &reply,
    )
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

/// Runs one RPC: method check, content negotiation, bounded body read, decode, handler, encode, metrics.
async fn rpc<Req, Res, F, Fut>(
    st: AppState,
    route: &'static str,
    req: Request,
    limit: usize,
    f: F,
) -> Response
where
    Req: prost::Message + Default + DeserializeOwned,
    Res: prost::Message + Serialize,
    F: FnOnce(Engine, Req) -> Fut,
    Fut: Future<Output = Result<Res, ApiError>>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let accept = pb::response_encoding(header_str(&parts.headers, header::ACCEPT));
    let out_enc = *accept.as_ref().unwrap_or(&Encoding::Json);
    let result: Result<Res, ApiError> = async {
        let out = accept?;
        let _ = out;
        if parts.method != Method::POST {
            return Err(ApiError::MethodNotAllowed(parts.method.to_string()));
        }
        // curl sends form-urlencoded unless told otherwise; a form body is never valid here, so reading it as JSON
        // lets `curl -d '{...}'` work (Querator answers 455).
        let ct = header_str(&parts.headers, header::CONTENT_TYPE).filter(|ct| {
            !ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
        let in_enc = pb::request_encoding(ct)?;
        let bytes = read_limited(body, limit).await?;
        let msg: Req = pb::decode(in_enc, &bytes)?;
        f(st.engine.clone(), msg).await
    }
    .await;
    let (response, code) = match result {
        Ok(res) => (encoded(out_enc, StatusCode::OK, &res), 200),
        Err(e) => (error_response(out_enc, &e), e.code()),
    };
    st.metrics
        .requests
        .get_or_create(&RouteLabels {
            route: route.to_string(),
            code,
        })
        .inc();
    st.metrics
        .latency
        .get_or_create(&RouteOnly {
            route: route.to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn read_limited(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge(limit))
        }
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

async fn no_such_method(req: Request) -> Response {
    let enc = pb::response_encoding(header_str(req.headers(), header::ACCEPT)).unwrap_or(Encoding::Json);
    if req.method() != Method::POST && req.uri().path().starts_with("/v1/") {
        return error_response(enc, &ApiError::MethodNotAllowed(req.method().to_string()));
    }
    error_response(enc, &ApiError::NoSuchMethod(req.uri().path().to_string()))
}

fn ok() -> Reply {
    Reply::ok()
}

// ---- queue ---------------------------------------------------------------------------------------------------

async fn produce(State(st): State<AppState>, req: Request) -> Response {
    let limit = st.max_produce_body;
    rpc(
        st,
        "/v1/queue.produce",
        req,
        limit,
        |e, r: pb::QueueProduceRequest| async move {
            let timeout = convert::duration("request timeout", &r.request_timeout)?;
            e.produce(&r.queue_name, convert::produce_items(r.items), timeout)
                .await?;
            Ok(ok())
        },
    )
    .await
}

async fn lease(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queue.lease",
        req,
        SMALL,
        |e, r: pb::QueueLeaseRequest| async move {
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
                items: res.items.into_iter().map(convert::lease_item).collect(),
            })
        },
    )
    .await
}

async fn complete(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queue.complete",
        req,
        DEFAULT,
        |e, r: pb::QueueCompleteRequest| async move {
            let timeout = convert::duration("request timeout", &r.request_timeout)?;
            let ids = convert::item_ids(&r.ids)?;
            let partition = convert::partition(r.partition)?;
            e.complete(&r.queue_name, partition, ids, timeout).await?;
            Ok(ok())
        },
    )
    .await
}

async fn retry(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queue.retry",
        req,
        DEFAULT,
        |e, r: pb::QueueRetryRequest| async move {
            let items = convert::retry_items(r.items)?;
            let partition = convert::partition(r.partition)?;
            e.retry(&r.queue_name, partition, items).await?;
            Ok(ok())
        },
    )
    .await
}

async fn stats(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queue.stats",
        req,
        SMALL,
        |e, r: pb::QueueStatsRequest| async move {
            let s = e.stats(&r.queue_name).await?;
            Ok(convert::stats_out(r.queue_name, s))
        },
    )
    .await
}

async fn clear(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queue.clear",
        req,
        SMALL,
        |e, r: pb::QueueClearRequest| async move {
            let c = ClearRequest {
                queue: r.queue,
                scheduled: r.scheduled,
                destructive: r.destructive,
            };
            e.clear(&r.queue_name, c).await?;
            Ok(ok())
        },
    )
    .await
}

async fn reload(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queue.reload",
        req,
        SMALL,
        |e, r: pb::QueueReloadRequest| async move {
            e.reload(&r.queue_name).await?;
            Ok(ok())
        },
    )
    .await
}

// ---- queues --------------------------------------------------------------------------------------------------

async fn queues_create(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queues.create",
        req,
        DEFAULT,
        |e, r: pb::QueueInfo| async move {
            e.create_queue(convert::queue_info_in(r)?).await?;
            Ok(ok())
        },
    )
    .await
}

async fn queues_list(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queues.list",
        req,
        DEFAULT,
        |e, r: pb::QueuesListRequest| async move {
            let limit = convert::list_limit(r.limit)?;
            let ns = if r.namespace.is_empty() {
                DEFAULT_NAMESPACE.to_string()
            } else {
                r.namespace
            };
            let qs = e.list_queues(&r.pivot, limit, &ns).await?;
            Ok(pb::QueuesListResponse {
                items: qs.into_iter().map(convert::queue_info_out).collect(),
            })
        },
    )
    .await
}

async fn queues_update(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queues.update",
        req,
        UPDATE,
        |e, r: pb::QueueInfo| async move {
            e.update_queue(convert::queue_update(r)?).await?;
            Ok(ok())
        },
    )
    .await
}

async fn queues_delete(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queues.delete",
        req,
        DEFAULT,
        |e, r: pb::QueuesDeleteRequest| async move {
            e.delete_queue(&r.queue_name).await?;
            Ok(ok())
        },
    )
    .await
}

async fn queues_info(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/queues.info",
        req,
        DEFAULT,
        |e, r: pb::QueuesInfoRequest| async move {
            Ok(convert::queue_info_out(e.queue_info(&r.queue_name).await?))
        },
    )
    .await
}

// ---- storage -------------------------------------------------------------------------------------------------

async fn storage_list(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/storage/items.list",
        req,
        DEFAULT,
        |e, r: pb::StorageItemsListRequest| async move {
            let limit = convert::list_limit(r.limit)?;
            let pivot = convert::pivot(&r.pivot)?;
            let partition = convert::partition(r.partition)?;
            let items = e
                .storage_list(&r.queue_name, partition, pivot, limit, false)
                .await?;
            Ok(pb::StorageItemsListResponse {
                items: items.into_iter().map(convert::storage_item).collect(),
            })
        },
    )
    .await
}

async fn storage_scheduled(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/storage/scheduled.list",
        req,
        DEFAULT,
        |e, r: pb::StorageItemsListRequest| async move {
            let limit = convert::list_limit(r.limit)?;
            let pivot = convert::pivot(&r.pivot)?;
            let partition = convert::partition(r.partition)?;
            let items = e
                .storage_list(&r.queue_name, partition, pivot, limit, true)
                .await?;
            Ok(pb::StorageItemsListResponse {
                items: items.into_iter().map(convert::storage_item).collect(),
            })
        },
    )
    .await
}

async fn storage_import(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/storage/items.import",
        req,
        IMPORT,
        |e, r: pb::StorageItemsImportRequest| async move {
            let items = r
                .items
                .into_iter()
                .map(convert::import_item)
                .collect::<Result<Vec<_>, _>>()?;
            let partition = convert::partition(r.partition)?;
            let out = e.storage_import(&r.queue_name, partition, items).await?;
            Ok(pb::StorageItemsImportResponse {
                items: out.into_iter().map(convert::storage_item).collect(),
            })
        },
    )
    .await
}

async fn storage_delete(State(st): State<AppState>, req: Request) -> Response {
    rpc(
        st,
        "/v1/storage/items.delete",
        req,
        DEFAULT,
        |e, r: pb::StorageItemsDeleteRequest| async move {
            let ids = convert::item_ids(&r.ids)?;
            let partition = convert::partition(r.partition)?;
            e.storage_delete(&r.queue_name, partition, ids).await?;
            Ok(ok())
        },
    )
    .await
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

async fn metrics(State(st): State<AppState>) -> Response {
    let mut r = st.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}
