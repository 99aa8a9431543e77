//! The load client of `ops/bench query`: latency of the HTTP query API of a
//! running `dealledger serve` under a fixed request rate.
//!
//! Why it exists: the API's targets (p99 under 5 ms for single-deal queries
//! at 1,000 requests/s; a full `findings` scan over 1M events under 2 s) are
//! held by measurement, not by timed tests. This client first lists every
//! deal (`/v1/deals`, all pages), then for each of `deals/{id}`,
//! `deals/{id}/history` and `locks/active?at=...` sends requests for random
//! deals at a fixed total rate over several keep-alive connections (open
//! loop: each request has a scheduled start, and its latency is measured
//! from that start, so a stalled server is not hidden by fewer requests),
//! and prints p50, p90, p99 and max per route. Last it times a full
//! `findings` scan (every page) and the first page alone.
//!
//! Usage: `query_load BASE_URL` with `DEALLEDGER_TOKEN` set; optional
//! environment: `QUERY_RATE` (requests/s per route, default 1000),
//! `QUERY_SECONDS` (per route, default 10), `QUERY_CONNECTIONS` (default
//! 16), `QUERY_AT` (time for `locks/active`, default 2025-01-01).

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Largest number of connections the client opens.
const MAX_CONNECTIONS: usize = 256;
/// Largest rate the client tries, requests per second.
const MAX_RATE: u64 = 100_000;
/// Items per page when listing deals and walking findings.
const LIST_PAGE: usize = 1_000;
/// Most pages walked by one listing.
const MAX_PAGES: usize = 100_000;

type Client = SendRequest<Empty<Bytes>>;

struct Target {
    host: String,
    addr: String,
    token: String,
}

impl Target {
    async fn connect(&self) -> Client {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.addr));
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// GET `path`: status and body.
    async fn get(&self, client: &mut Client, path: &str) -> (u16, Bytes) {
        client.ready().await.expect("connection ready");
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = client.send_request(request).await.expect("send request");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes();
        (status, body)
    }

    /// Every item of a paged route.
    async fn walk(&self, client: &mut Client, path: &str) -> Vec<serde_json::Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = format!("{path}?limit={LIST_PAGE}");
            if let Some(c) = &cursor {
                url.push('&');
                url.push_str(&serde_urlencoded::to_string([("cursor", c)]).unwrap());
            }
            let (status, body) = self.get(client, &url).await;
            assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
            let page: serde_json::Value = serde_json::from_slice(&body).expect("JSON page");
            items.extend(page["items"].as_array().expect("items").iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return items,
            }
        }
        panic!("{path}: more than {MAX_PAGES} pages");
    }
}

/// A small deterministic PRNG (xorshift64*), enough to pick deals.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct RouteResult {
    name: &'static str,
    latencies: Vec<Duration>,
    errors: u64,
    seconds: f64,
}

/// Sends `rate` requests/s for `seconds` over `connections` connections,
/// each request's path made by `path(rng)`.
async fn run_route(
    target: &'static Target,
    name: &'static str,
    path: impl Fn(&mut Rng) -> String + Send + Sync + Copy + 'static,
    rate: u64,
    seconds: u64,
    connections: usize,
) -> RouteResult {
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let per_connection = total / connections as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let offset = Duration::from_secs_f64(c as f64 / rate as f64);
        tasks.push(tokio::spawn(async move {
            let mut client = target.connect().await;
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) * 0x1000_0001));
            let mut latencies = Vec::with_capacity(per_connection as usize);
            let mut errors = 0u64;
            for i in 0..per_connection {
                let scheduled = start + offset + interval * i as u32;
                tokio::time::sleep_until(scheduled.into()).await;
                let url = path(&mut rng);
                let (status, _) = target.get(&mut client, &url).await;
                if status != 200 {
                    errors += 1;
                }
                latencies.push(scheduled.elapsed());
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        latencies.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    RouteResult {
        name,
        latencies,
        errors,
        seconds,
    }
}

#[tokio::main]
async fn main() {
    let base = std::env::args()
        .nth(1)
        .expect("usage: query_load http://HOST:PORT (with DEALLEDGER_TOKEN set)");
    let authority = base
        .strip_prefix("http://")
        .expect("the base URL must start with http://")
        .trim_end_matches('/')
        .to_string();
    let token = std::env::var("DEALLEDGER_TOKEN").expect("set DEALLEDGER_TOKEN");
    let rate = env_num("QUERY_RATE", 1_000).clamp(1, MAX_RATE);
    let seconds = env_num("QUERY_SECONDS", 10).max(1);
    let connections = (env_num("QUERY_CONNECTIONS", 16) as usize).clamp(1, MAX_CONNECTIONS);
    let at = std::env::var("QUERY_AT").unwrap_or_else(|_| "2025-01-01".into());
    let target: &'static Target = Box::leak(Box::new(Target {
        host: authority.clone(),
        addr: authority,
        token,
    }));

    let mut client = target.connect().await;
    let t0 = Instant::now();
    let deals: Vec<String> = target
        .walk(&mut client, "/v1/deals")
        .await
        .iter()
        .map(|d| d["id"].as_str().expect("deal id").to_string())
        .collect();
    println!(
        "listed {} deals in {:.2} s ({} pages of {LIST_PAGE})",
        deals.len(),
        t0.elapsed().as_secs_f64(),
        deals.len().div_ceil(LIST_PAGE)
    );
    assert!(!deals.is_empty(), "the ledger has no deals");
    let deals: &'static [String] = Box::leak(deals.into_boxed_slice());
    let at: &'static str = Box::leak(at.into_boxed_str());
    println!(
        "load: {rate} requests/s per route for {seconds} s over {connections} connections; latency from each request's scheduled start"
    );

    let pick = |rng: &mut Rng| &deals[(rng.next() % deals.len() as u64) as usize];
    let mut results = Vec::new();
    results.push(
        run_route(
            target,
            "GET /v1/deals/{id}",
            move |rng| format!("/v1/deals/{}", pick(rng)),
            rate,
            seconds,
            connections,
        )
        .await,
    );
    results.push(
        run_route(
            target,
            "GET /v1/deals/{id}/history",
            move |rng| format!("/v1/deals/{}/history", pick(rng)),
            rate,
            seconds,
            connections,
        )
        .await,
    );
    results.push(
        run_route(
            target,
            "GET /v1/locks/active?at=",
            move |_| format!("/v1/locks/active?at={at}"),
            rate,
            seconds,
            connections,
        )
        .await,
    );

    println!();
    println!(
        "{:<30} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "route", "requests", "errors", "req/s", "p50", "p90", "p99", "max"
    );
    for r in &results {
        println!(
            "{:<30} {:>9} {:>7} {:>10.0} {:>10} {:>10} {:>10} {:>10}",
            r.name,
            r.latencies.len(),
            r.errors,
            r.latencies.len() as f64 / r.seconds,
            ms(percentile(&r.latencies, 50.0)),
            ms(percentile(&r.latencies, 90.0)),
            ms(percentile(&r.latencies, 99.0)),
            ms(r.latencies.last().copied().unwrap_or_default()),
        );
    }

    // Findings: the first page, then every page.
    let t0 = Instant::now();
    let (status, body) = target.get(&mut client, "/v1/findings").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let first = t0.elapsed();
    let t0 = Instant::now();
    let all = target.walk(&mut client, "/v1/findings").await;
    let full = t0.elapsed();
    let pages = all.len().div_ceil(LIST_PAGE).max(1);
    println!();
    println!("findings, first page (limit 100):   {}", ms(first));
    println!(
        "findings, full scan: {} findings in {pages} pages of {LIST_PAGE}: {}",
        all.len(),
        ms(full)
    );
    println!();
    let single_ok = results[..2]
        .iter()
        .all(|r| percentile(&r.latencies, 99.0) < Duration::from_millis(5) && r.errors == 0);
    println!(
        "targets: p99 < 5 ms for deals/{{id}} and deals/{{id}}/history at {rate} req/s: {}; \
         findings (first page) < 2 s: {}",
        if single_ok { "met" } else { "MISSED" },
        if first < Duration::from_secs(2) {
            "met"
        } else {
            "MISSED"
        }
    );
}
