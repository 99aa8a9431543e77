//! The `/v1` query routes: the compliance queries of [`crate::query`] as
//! JSON, the export file streamed, and the OpenAPI document describing them.
//!
//! Why it exists: officers and tools ask the running daemon the same
//! questions the CLI asks a stopped ledger, and must get the same answer, so
//! every handler only turns parameters into a [`crate::query`] call and
//! serializes its answer with serde, exactly as the CLI does offline. The
//! answer is computed on the blocking pool while holding the state's read
//! lock (the ingester takes the write lock only while it applies a batch in
//! memory); the lock is released before the answer is sent.
//!
//! Parameters are strict: an unknown or repeated query parameter, a
//! malformed number, time, duration, status, kind, cursor or deal id is
//! answered with 400 and a JSON error naming the parameter.
//!
//! The ingester makes a batch visible in memory before the store has it
//! durable, so an answer may cite an entry not yet readable; such a query is
//! retried every [`EVIDENCE_RETRY_DELAY`] for up to [`EVIDENCE_RETRY_LIMIT`],
//! then answered with 503.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};

use super::{ApiError, ApiState, LedgerHandle};
use crate::event::Id;
use crate::ledger::LedgerState;
use crate::query::{self, DealFilter, FindingFilter, PageRequest, QueryError};
use crate::replay::parse_time;
use crate::store::Store;

/// The OpenAPI 3.1 document of the API (`GET /v1/openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// Wait between two tries of a query whose evidence is not stored yet.
pub const EVIDENCE_RETRY_DELAY: Duration = Duration::from_millis(5);

/// Longest a query waits for its evidence to be stored before answering 503.
pub const EVIDENCE_RETRY_LIMIT: Duration = Duration::from_secs(2);

/// Size of one chunk of a streamed export, in bytes.
pub const EXPORT_CHUNK_BYTES: usize = 64 * 1024;

/// Chunks of an export buffered between the exporting thread and the
/// connection; the exporter waits when the client reads slowly.
pub const EXPORT_CHANNEL_CHUNKS: usize = 8;

/// Longest query parameter name quoted back in an error.
const MAX_QUOTED_NAME_CHARS: usize = 64;

/// Most queries computed at once; further ones wait for a turn (within the
/// request timeout), so a burst cannot occupy every blocking thread.
pub const MAX_CONCURRENT_QUERIES: usize = 32;

/// Most exports streamed at once; a further one is answered 503.
pub const MAX_CONCURRENT_EXPORTS: usize = 2;

static QUERY_SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_QUERIES);
static EXPORT_SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_EXPORTS);

/// Every `/v1` route.
pub(super) fn v1_routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/deals", get(deals_list))
        .route("/v1/deals/{id}", get(deal_show))
        .route("/v1/deals/{id}/history", get(deal_history))
        .route("/v1/locks/active", get(locks_active))
        .route("/v1/findings", get(findings))
        .route("/v1/stats", get(stats))
        .route("/v1/export", get(export))
}

// ---------------------------------------------------------------------------
// Parameters.
// ---------------------------------------------------------------------------

/// The query parameters of one request, checked against the route's list.
struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Parses the query string; an unknown or repeated name is a 400 naming it.
    fn parse(raw: Option<String>, allowed: &[&'static str]) -> Result<Params, ApiError> {
        let raw = raw.unwrap_or_default();
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw).map_err(|e| {
            ApiError::bad_parameter("query", format!("the query string is malformed: {e}"))
        })?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            let quoted: String = name.chars().take(MAX_QUOTED_NAME_CHARS).collect();
            if !allowed.contains(&name.as_str()) {
                let expected = if allowed.is_empty() {
                    "this route takes no query parameters".to_string()
                } else {
                    format!("expected one of {}", allowed.join(", "))
                };
                return Err(ApiError::bad_parameter(
                    quoted.clone(),
                    format!("unknown query parameter {quoted:?}; {expected}"),
                ));
            }
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(ApiError::bad_parameter(
                    quoted.clone(),
                    format!("query parameter {quoted:?} is given more than once"),
                ));
            }
        }
        Ok(Params { pairs })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn page(&self) -> Result<PageRequest, ApiError> {
        let limit = match self.get("limit") {
            None => None,
            Some(s) => Some(s.parse::<usize>().map_err(|_| {
                ApiError::bad_parameter(
                    "limit",
                    format!(
                        "{s:?} is not a whole number; expected 1..={}",
                        query::MAX_PAGE_SIZE
                    ),
                )
            })?),
        };
        Ok(PageRequest {
            limit,
            cursor: self.get("cursor").map(str::to_string),
        })
    }

    fn time(&self, name: &'static str) -> Result<Option<crate::event::Timestamp>, ApiError> {
        self.get(name)
            .map(|s| parse_time(s).map_err(|e| ApiError::bad_parameter(name, e)))
            .transpose()
    }

    fn id(&self, name: &'static str) -> Result<Option<Id>, ApiError> {
        self.get(name)
            .map(|s| Id::new(s).map_err(|e| ApiError::bad_parameter(name, e)))
            .transpose()
    }
}

/// The deal id of the path, checked against [`Id::RULE`].
fn deal_id(path: Result<Path<String>, PathRejection>) -> Result<Id, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::bad_parameter("id", e.body_text()))?;
    Id::new(raw).map_err(|e| ApiError::bad_parameter("id", e))
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::BadParameter { name, reason } => ApiError::bad_parameter(name, reason),
            QueryError::UnknownDeal(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            QueryError::Evidence(msg) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the entries behind the answer could not be read: {msg}"),
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Running a query.
// ---------------------------------------------------------------------------

fn ledger(state: &ApiState) -> Result<LedgerHandle, ApiError> {
    state.ledger.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this listener serves no ledger",
        )
    })
}

/// Runs `query` on the blocking pool under the state's read lock, retrying
/// while its evidence is not stored yet, and answers its result as JSON.
async fn answer<T, F>(state: &ApiState, query: F) -> Result<Response, ApiError>
where
    T: Serialize,
    F: Fn(&LedgerState, &Store) -> Result<T, QueryError> + Send + 'static,
{
    let ledger = ledger(state)?;
    let slot = QUERY_SLOTS.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    })?;
    let started = Instant::now();
    let body = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let _slot = slot;
        loop {
            let result = {
                let guard = ledger.state.read().map_err(|_| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the ledger state is unavailable: the ingester failed while updating it; restart serve",
                    )
                })?;
                query(&guard, &ledger.store)
            };
            match result {
                Err(QueryError::Evidence(msg)) if started.elapsed() < EVIDENCE_RETRY_LIMIT => {
                    tracing::debug!(%msg, "evidence not stored yet; retrying the query");
                    std::thread::sleep(EVIDENCE_RETRY_DELAY);
                }
                Err(e) => return Err(e.into()),
                Ok(answer) => {
                    return serde_json::to_vec(&answer).map_err(|e| {
                        ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("cannot serialize the answer: {e}"),
                        )
                    });
                }
            }
        }
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the query failed: {e}"),
        )
    })??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

// ---------------------------------------------------------------------------
// Handlers.
// ---------------------------------------------------------------------------

async fn openapi(RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    Params::parse(raw, &[])?;
    Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response())
}

async fn deals_list(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(raw, &["party", "status", "from", "to", "limit", "cursor"])?;
    let filter = DealFilter {
        party: p.id("party")?,
        status: p.get("status").map(query::parse_status).transpose()?,
        from: p.time("from")?,
        to: p.time("to")?,
    };
    let page = p.page()?;
    answer(&state, move |s, _| query::deals_list(s, &filter, &page)).await
}

async fn deal_show(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let id = deal_id(path)?;
    Params::parse(raw, &[])?;
    answer(&state, move |s, _| query::deal_show(s, &id)).await
}

async fn deal_history(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let id = deal_id(path)?;
    let p = Params::parse(raw, &["limit", "cursor"])?;
    let page = p.page()?;
    answer(&state, move |s, store| {
        query::deal_history(s, store, &id, &page)
    })
    .await
}

async fn locks_active(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(raw, &["at", "limit", "cursor"])?;
    let at = p.time("at")?.ok_or_else(|| {
        ApiError::bad_parameter(
            "at",
            format!(
                "missing; give the business time to judge the locks at, {}",
                crate::replay::TIME_RULE
            ),
        )
    })?;
    let page = p.page()?;
    answer(&state, move |s, _| query::locks_active(s, at, &page)).await
}

async fn findings(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(
        raw,
        &["from", "to", "kind", "max_backdate", "limit", "cursor"],
    )?;
    let filter = FindingFilter {
        from: p.time("from")?,
        to: p.time("to")?,
        kind: p.get("kind").map(str::to_string),
        max_backdate_ms: p
            .get("max_backdate")
            .map(query::parse_duration_ms)
            .transpose()?,
    };
    let page = p.page()?;
    answer(&state, move |s, store| {
        query::findings(s, store, &filter, &page)
    })
    .await
}

async fn stats(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(raw, &["limit", "cursor"])?;
    let page = p.page()?;
    answer(&state, move |s, _| query::stats(s, &page)).await
}

// ---------------------------------------------------------------------------
// Export.
// ---------------------------------------------------------------------------

type Chunk = Result<Bytes, io::Error>;

/// A [`Write`] that hands the export to the connection in chunks of
/// [`EXPORT_CHUNK_BYTES`]; fails once the client has gone.
struct ChunkSender {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(EXPORT_CHUNK_BYTES));
        self.tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client closed the connection",
            )
        })
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = EXPORT_CHUNK_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= EXPORT_CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// `GET /v1/export`: the export file format, streamed as it is written. The
/// exporter reads the store only (never the state lock) and holds at most
/// [`EXPORT_CHANNEL_CHUNKS`] chunks in memory. A failure before the first
/// chunk is a JSON error; a failure after it aborts the connection, so the
/// client sees a truncated body (which `dealledger verify --export` refuses:
/// the trailer is missing).
async fn export(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(raw, &[])?;
    let ledger = ledger(&state)?;
    let store = Arc::clone(&ledger.store);
    let topic = store.topic().to_string();
    let slot = EXPORT_SLOTS.try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_CONCURRENT_EXPORTS} exports are already being streamed; retry later"),
        )
    })?;
    let (tx, mut rx) = mpsc::channel::<Chunk>(EXPORT_CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let writer = ChunkSender {
            tx: tx.clone(),
            buf: Vec::with_capacity(EXPORT_CHUNK_BYTES),
        };
        let result = crate::export::export_store(&store, writer, |_| {}).and_then(
            |(mut writer, summary)| {
                writer
                    .flush()
                    .map_err(|source| crate::export::WriteError::Io {
                        at: summary.bytes,
                        source,
                    })?;
                Ok(summary)
            },
        );
        match result {
            Ok(summary) => tracing::info!(
                entries = summary.header.entries,
                bytes = summary.bytes,
                "export streamed"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "export over HTTP failed");
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
        }
    });
    let first = match rx.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("export failed: {e}"),
            ));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "export failed: the exporter stopped without writing",
            ));
        }
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let stream = futures::StreamExt::chain(futures::stream::iter([Ok(first)]), rest);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{topic}.dlx\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
