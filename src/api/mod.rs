//! The HTTP listener of `dealledger serve`.
//!
//! Why it exists: the daemon runs unattended, so it must answer the two
//! questions operators and orchestrators ask of it over HTTP: "are you well?"
//! (`GET /health`, for probes and humans) and "what are you doing?"
//! (`GET /metrics`, for Prometheus); and it serves the read-only query API
//! (`GET /v1/...`, [`routes`], described by `docs/openapi.json`) behind
//! bearer tokens ([`auth`]), over plain HTTP or TLS ([`TlsFiles`]).
//!
//! Every request is bounded: its body by [`MAX_REQUEST_BODY_BYTES`] (answered
//! with 413) and its handling time by [`REQUEST_TIMEOUT`] (answered with
//! 503). Paths that do not exist are answered with 404 and a JSON
//! [`ErrorBody`], methods a route does not allow with 405 and one too.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::metrics::{HealthStatus, Metrics};

pub mod auth;
pub mod routes;

pub use auth::Auth;

/// Largest request body accepted, in bytes. Every route so far is a `GET`;
/// this only leaves room for small query documents later.
pub const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024;

/// Longest time a request may take to be handled before it is answered with
/// 503 Service Unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Content type of `GET /metrics`: Prometheus text exposition format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the HTTP listener listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address and port to bind, e.g. `127.0.0.1:9464`.
    pub listen: SocketAddr,
}

impl ApiConfig {
    /// Binds the listener; do this before starting ingest so a port clash
    /// fails the daemon at once.
    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        TcpListener::bind(self.listen).await
    }
}

/// What the handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The daemon's metrics, written by the ingest loop.
    pub metrics: Arc<Metrics>,
    /// The ledger the queries read; `None` serves only `/health` and `/metrics`.
    pub ledger: Option<LedgerHandle>,
    /// The accepted bearer tokens.
    pub auth: Arc<Auth>,
}

/// The live ledger: the state the ingester keeps current, and the store
/// the cited entries are read from.
#[derive(Clone)]
pub struct LedgerHandle {
    /// The shared state (deal book and query index).
    pub state: crate::ingest::SharedState,
    /// The store, for the entries behind answers.
    pub store: Arc<crate::store::Store>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong, in one line.
    pub error: String,
    /// For a 400: the query or path parameter that was wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
}

/// An error answer: a status code and a JSON [`ErrorBody`].
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong, in one line.
    pub message: String,
    /// For a 400: the parameter that was wrong.
    pub parameter: Option<String>,
}

impl ApiError {
    /// An error answer with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            parameter: None,
        }
    }

    /// A 400 naming the parameter that was wrong.
    pub fn bad_parameter(name: impl Into<String>, reason: impl Into<String>) -> Self {
        let name = name.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("parameter {name}: {}", reason.into()),
            parameter: Some(name),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
                parameter: self.parameter,
            }),
        )
            .into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"dealledger\""),
            );
        }
        response
    }
}

/// The whole HTTP application: every route, the fallbacks and the limits.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .merge(operational_routes())
        .merge(routes::v1_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(RequestBodyLimitLayer::new(MAX_REQUEST_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// `GET /health` and `GET /metrics`.
fn operational_routes() -> Router<ApiState> {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
}

/// Serves the API on `listener` until `shutdown` completes, then stops
/// accepting connections and waits for requests in flight (each bounded by
/// [`REQUEST_TIMEOUT`]) before returning.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API listening");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Longest time the TLS listener waits for requests in flight at shutdown.
pub const TLS_SHUTDOWN_GRACE: Duration = REQUEST_TIMEOUT;

/// Longest time a client may take for its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest certificate or key file read, in bytes.
pub const MAX_TLS_FILE_BYTES: u64 = 1 << 20;

/// The certificate chain and private key of the HTTPS listener, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM file with its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the TLS {what} file {}: {source}", path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_TLS_FILE_BYTES`].
    #[error("the TLS {what} file {} is larger than {MAX_TLS_FILE_BYTES} bytes; is it the right file?", path.display())]
    TooLarge {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("the TLS {what} file {} {reason}", path.display())]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair, e.g. a key that does not match the certificate.
    #[error("the TLS certificate {} and key {} cannot be used together: {reason}", cert.display(), key.display())]
    Refused {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

impl TlsFiles {
    fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
        let io = |source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        };
        if std::fs::metadata(path).map_err(io)?.len() > MAX_TLS_FILE_BYTES {
            return Err(TlsError::TooLarge {
                what,
                path: path.to_path_buf(),
            });
        }
        std::fs::read(path).map_err(io)
    }

    /// Reads both files and builds the TLS server configuration (TLS 1.2
    /// and 1.3, HTTP/1.1), checking that the key matches the certificate.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let cert_pem = Self::read("certificate", &self.cert)?;
        let key_pem = Self::read("key", &self.key)?;
        let pem_error = |what, path: &Path, reason: String| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error("certificate", &self.cert, format!("is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(pem_error(
                "certificate",
                &self.cert,
                "holds no CERTIFICATE block".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            pem_error(
                "key",
                &self.key,
                format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            )
        })?;
        let refused = |reason: String| TlsError::Refused {
            cert: self.cert.clone(),
            key: self.key.clone(),
            reason,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| refused(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| refused(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Like [`serve`], over TLS with `tls` (see [`TlsFiles::load`]): plain HTTP
/// to this listener fails the handshake.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTPS API listening");
    }
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(TLS_SHUTDOWN_GRACE));
    });
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(
        axum_server::tls_rustls::RustlsConfig::from_config(tls),
    )
    .handshake_timeout(TLS_HANDSHAKE_TIMEOUT);
    axum_server::from_tcp(listener.into_std()?)?
        .acceptor(acceptor)
        .handle(handle)
        .serve(router(state).into_make_service())
        .await
}

/// The health document; 200 when ok, 503 otherwise, so it can serve as a
/// readiness probe as is.
async fn health(State(state): State<ApiState>) -> Response {
    let health = state.metrics.health();
    let status = if health.status == HealthStatus::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(health)).into_response()
}

/// The metrics in the Prometheus text format.
async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.metrics.render_prometheus(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such resource: {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::IngestState;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// Upper bound on any test's wait for the server.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    struct Server {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        stop: oneshot::Sender<()>,
        task: JoinHandle<std::io::Result<()>>,
    }

    async fn start() -> Server {
        let listener = ApiConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        }
        .bind()
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let state = ApiState {
            metrics: metrics.clone(),
            ledger: None,
            auth: Arc::new(Auth::new(false)),
        };
        let task = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            metrics,
            stop,
            task,
        }
    }

    impl Server {
        async fn shutdown(self) {
            self.stop.send(()).unwrap();
            tokio::time::timeout(TEST_DEADLINE, self.task)
                .await
                .expect("server stops")
                .expect("server task does not panic")
                .expect("server returns Ok");
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> serde_json::Value {
            assert_eq!(self.header("content-type"), Some("application/json"));
            serde_json::from_str(&self.body).expect("JSON body")
        }
    }

    /// A minimal HTTP/1.1 client: sends `head` (request line and headers,
    /// without the blank line), reads the reply to EOF.
    async fn request(addr: SocketAddr, head: &str) -> Reply {
        let request = format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n");
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            raw
        };
        let raw = tokio::time::timeout(TEST_DEADLINE, exchange)
            .await
            .expect("reply in time");
        let text = String::from_utf8(raw).expect("UTF-8 reply");
        let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"));
        let status = parts.next().unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("header line");
                (name.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        let reply = Reply {
            status,
            headers,
            body: body.to_owned(),
        };
        assert_ne!(
            reply.header("transfer-encoding"),
            Some("chunked"),
            "this client does not decode chunked bodies"
        );
        if let Some(length) = reply.header("content-length")
            && !request.starts_with("HEAD ")
        {
            assert_eq!(length.parse::<usize>().unwrap(), reply.body.len());
        }
        reply
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, &format!("GET {path} HTTP/1.1")).await
    }

    #[tokio::test]
    async fn health_follows_the_metrics() {
        let server = start().await;

        let reply = get(server.addr, "/health").await;
        assert_eq!(reply.status, 503);
        let json = reply.json();
        assert_eq!(json["status"], "starting");
        assert_eq!(json["ingest"]["state"], "starting");
        assert_eq!(json["kafka"]["connected"], false);

        server.metrics.set_ingest_state(IngestState::Running);
        server.metrics.set_kafka_status(true, None);
        server.metrics.set_position(0, 5);
        server.metrics.set_high_watermark(0, 9);
        let reply = get(server.addr, "/health").await;
        assert_eq!(reply.status, 200);
        let json = reply.json();
        assert_eq!(json["status"], "ok");
        assert_eq!(json["partitions"][0]["lag"], 4);

        server
            .metrics
            .set_kafka_status(false, Some("all brokers down".into()));
        let reply = get(server.addr, "/health").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["status"], "degraded");

        server
            .metrics
            .set_ingest_state(IngestState::Failed("disk full".into()));
        let reply = get(server.addr, "/health").await;
        assert_eq!(reply.status, 503);
        let json = reply.json();
        assert_eq!(json["status"], "failed");
        assert_eq!(json["ingest"]["error"], "disk full");

        server.shutdown().await;
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let server = start().await;

        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(PROMETHEUS_CONTENT_TYPE));
        assert!(reply.body.contains("\ndealledger_up 0\n"));
        assert!(!reply.body.contains("dealledger_events_total{"));

        server.metrics.record(7, "accepted", None);
        server.metrics.record(7, "rejected", Some("schema"));
        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .body
                .contains("\ndealledger_events_total{partition=\"7\",verdict=\"accepted\"} 1\n"),
            "{}",
            reply.body
        );
        assert!(
            reply
                .body
                .contains("\ndealledger_rejections_total{kind=\"schema\"} 1\n")
        );

        // HEAD is answered like GET, without a body.
        let reply = request(server.addr, "HEAD /metrics HTTP/1.1").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(PROMETHEUS_CONTENT_TYPE));

        server.shutdown().await;
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_get_json_errors() {
        let server = start().await;

        let reply = get(server.addr, "/nope").await;
        assert_eq!(reply.status, 404);
        let error = reply.json();
        assert_eq!(error["error"], "no such resource: /nope");

        let reply = request(server.addr, "DELETE /health HTTP/1.1").await;
        assert_eq!(reply.status, 405);
        assert!(reply.json()["error"].as_str().unwrap().contains("DELETE"));

        server.shutdown().await;
    }

    #[tokio::test]
    async fn large_bodies_are_refused() {
        let server = start().await;
        let too_large = MAX_REQUEST_BODY_BYTES + 1;
        let reply = request(
            server.addr,
            &format!("GET /health HTTP/1.1\r\nContent-Length: {too_large}"),
        )
        .await;
        assert_eq!(reply.status, 413);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_stops_the_listener() {
        let server = start().await;
        let addr = server.addr;
        assert_eq!(get(addr, "/health").await.status, 503);
        server.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
