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
//!
//! Soak mode (`query_load BASE_URL soak`, used by `ops/bench soak` while
//! events are ingested at a steady rate): for `SOAK_SECONDS` (default 600)
//! sends `QUERY_RATE` requests/s in all (default 100), the three routes in
//! turn, open loop as above, over `QUERY_CONNECTIONS` (default 8), and every
//! `SOAK_INTERVAL` seconds (default 60) prints one line: events ingested so
//! far and the ingest rate over the interval (from `/metrics`), events sent
//! by the producer over the interval (the count in `SOAK_PRODUCED_FILE`, if
//! given), the consumer lag, the RSS, peak RSS and anonymous RSS of
//! process `SOAK_PID` (`/proc/PID/status`, if given), the size of the
//! ledger folder `SOAK_DATA_DIR` (if given), the process's CPU use and
//! the machine's load average over the interval, and the query
//! p50/p99/max of the interval (a route's p99 includes waiting behind
//! another route's request on the same connection). At the end it prints
//! a verdict from those figures: RSS growth in the first and the last
//! intervals (and per event ingested), the RSS slope, and p99 drift;
//! figures only, no assertion. Deal ids come from `QUERY_DEALS_FILE` (one
//! per line, or `LINE<TAB>ID`: in soak mode that deal is queried once
//! `LINE` events are ingested, so that a steady load whose deals come and
//! go queries every deal that exists, old and new), or from listing
//! `/v1/deals`.

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
        .expect("usage: query_load http://HOST:PORT [soak] (with DEALLEDGER_TOKEN set)");
    match std::env::args().nth(2).as_deref() {
        None => fixed_rate(base).await,
        Some("soak") => soak::run(base).await,
        Some(other) => panic!("unknown mode {other:?}: the only mode argument is `soak`"),
    }
}

/// The target named by `base` (`http://HOST:PORT`), with `DEALLEDGER_TOKEN`.
fn target_from(base: &str) -> &'static Target {
    let authority = base
        .strip_prefix("http://")
        .expect("the base URL must start with http://")
        .trim_end_matches('/')
        .to_string();
    let token = std::env::var("DEALLEDGER_TOKEN").expect("set DEALLEDGER_TOKEN");
    Box::leak(Box::new(Target {
        host: authority.clone(),
        addr: authority,
        token,
    }))
}

/// Every deal id, by listing `/v1/deals` (all pages).
async fn list_deals(target: &Target, client: &mut Client) -> Vec<String> {
    let t0 = Instant::now();
    let deals: Vec<String> = target
        .walk(client, "/v1/deals")
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
    deals
}

/// The default mode: each route in turn at a fixed rate, then findings.
async fn fixed_rate(base: String) {
    let rate = env_num("QUERY_RATE", 1_000).clamp(1, MAX_RATE);
    let seconds = env_num("QUERY_SECONDS", 10).max(1);
    let connections = (env_num("QUERY_CONNECTIONS", 16) as usize).clamp(1, MAX_CONNECTIONS);
    let at = std::env::var("QUERY_AT").unwrap_or_else(|_| "2025-01-01".into());
    let target = target_from(&base);

    let mut client = target.connect().await;
    let deals = list_deals(target, &mut client).await;
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

/// Soak mode: a steady mixed query load for a long time, with one line of
/// figures per interval and a verdict at the end (see the module doc).
mod soak {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::{Client, MAX_CONNECTIONS, MAX_RATE, Rng, Target, env_num, percentile};

    /// Longest soak, seconds (a day).
    const MAX_SECONDS: u64 = 86_400;
    /// Clock ticks per second of `/proc/PID/stat` times (USER_HZ: 100 on Linux).
    const TICKS_PER_SECOND: f64 = 100.0;
    /// Shortest and longest reporting interval, seconds.
    const MIN_INTERVAL: u64 = 1;
    const MAX_INTERVAL: u64 = 3_600;
    /// Intervals compared at the start and the end by the verdict.
    const EDGE_INTERVALS: usize = 3;
    /// Largest deal-ids file read, lines.
    const MAX_DEAL_IDS: usize = 10_000_000;
    /// How often the deals queried are brought up to the events ingested.
    const DEALS_REFRESH: Duration = Duration::from_secs(1);
    /// The routes, in the order requests take them in turn.
    const ROUTES: [&str; 3] = ["deals/{id}", "deals/{id}/history", "locks/active"];

    /// Latencies and failures of the requests that finished in one interval.
    #[derive(Default)]
    struct Window {
        latencies: [Vec<Duration>; 3],
        /// Bytes of the answers, per route: what each request asked the
        /// server to produce.
        bytes: [u64; 3],
        /// Answers other than 200 and 404.
        errors: u64,
        /// 404 answers (a deal id that the ledger does not know).
        not_found: u64,
    }

    /// What `/metrics` said at one moment.
    #[derive(Clone, Copy, Default)]
    struct Scrape {
        ingested: f64,
        lag: Option<f64>,
    }

    /// The serve process's memory at one moment, KiB.
    #[derive(Clone, Copy, Default)]
    struct Memory {
        rss_kib: u64,
        hwm_kib: u64,
        /// The anonymous part of the RSS (heap), as opposed to mapped files.
        anon_kib: u64,
        /// CPU time used so far (user + system), seconds.
        cpu_seconds: f64,
    }

    /// The figures of one interval (row 0: the start, with no queries).
    struct Row {
        seconds: f64,
        scrape: Scrape,
        sent: Option<u64>,
        memory: Option<Memory>,
        disk_bytes: Option<u64>,
        load: Option<f64>,
        /// Deals queryable at the end of the interval.
        deals: usize,
        requests: usize,
        errors: u64,
        not_found: u64,
        p50: Duration,
        p99: Duration,
        max: Duration,
        route_p99: [Duration; 3],
        /// Mean answer size per route, KiB.
        route_kib: [f64; 3],
    }

    /// Settings read from the environment.
    struct Config {
        seconds: u64,
        interval: u64,
        rate: u64,
        connections: usize,
        at: String,
        pid: Option<u32>,
        produced_file: Option<String>,
        data_dir: Option<String>,
    }

    impl Config {
        fn from_env() -> Self {
            Config {
                seconds: env_num("SOAK_SECONDS", 600).clamp(1, MAX_SECONDS),
                interval: env_num("SOAK_INTERVAL", 60).clamp(MIN_INTERVAL, MAX_INTERVAL),
                rate: env_num("QUERY_RATE", 100).clamp(1, MAX_RATE),
                connections: (env_num("QUERY_CONNECTIONS", 8) as usize).clamp(1, MAX_CONNECTIONS),
                at: std::env::var("QUERY_AT").unwrap_or_else(|_| "2025-01-01".into()),
                pid: std::env::var("SOAK_PID").ok().map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("SOAK_PID={v} is not a process id"))
                }),
                produced_file: std::env::var("SOAK_PRODUCED_FILE").ok(),
                data_dir: std::env::var("SOAK_DATA_DIR").ok(),
            }
        }
    }

    /// One connection's share of the load: requests `c`, `c + connections`,
    /// ... of the schedule, until `end`; the route is the request's number
    /// modulo 3.
    struct Lane {
        target: &'static Target,
        deals: &'static Deals,
        at: &'static str,
        c: usize,
        connections: usize,
        rate: u64,
        start: Instant,
        end: Instant,
        window: Arc<Mutex<Window>>,
    }

    impl Lane {
        async fn run(self) {
            let mut client = self.target.connect().await;
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((self.c as u64 + 1) * 0x1000_0001));
            let mut i = self.c as u64;
            loop {
                let scheduled = self.start + Duration::from_secs_f64(i as f64 / self.rate as f64);
                if scheduled >= self.end {
                    return;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                let route = (i % ROUTES.len() as u64) as usize;
                let deal = self.deals.pick(rng.next());
                let url = match route {
                    0 => format!("/v1/deals/{deal}"),
                    1 => format!("/v1/deals/{deal}/history"),
                    _ => format!("/v1/locks/active?at={}", self.at),
                };
                let (status, body) = self.target.get(&mut client, &url).await;
                let latency = scheduled.elapsed();
                let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
                w.bytes[route] += body.len() as u64;
                match status {
                    200 => {}
                    404 => w.not_found += 1,
                    _ => w.errors += 1,
                }
                w.latencies[route].push(latency);
                i += self.connections as u64;
            }
        }
    }

    /// Sums the samples of a metric family (every label set).
    fn sum_family(text: &str, family: &str) -> Option<f64> {
        let prefix = format!("{family}{{");
        let mut found = false;
        let mut total = 0.0;
        for line in text.lines() {
            let ours = line.starts_with(&prefix) || line.split(' ').next() == Some(family);
            if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
                && ours
            {
                total += v;
                found = true;
            }
        }
        found.then_some(total)
    }

    async fn scrape(target: &Target, client: &mut Client) -> Scrape {
        let (status, body) = target.get(client, "/metrics").await;
        assert_eq!(status, 200, "/metrics answered {status}");
        let text = String::from_utf8_lossy(&body);
        Scrape {
            ingested: sum_family(&text, "dealledger_events_total").unwrap_or(0.0),
            lag: sum_family(&text, "dealledger_consumer_lag"),
        }
    }

    /// VmRSS and VmHWM of `pid`, or `None` if it cannot be read.
    fn memory(pid: u32) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            anon_kib: field("RssAnon:")?,
            cpu_seconds: cpu_seconds(pid)?,
        })
    }

    /// User + system CPU time of `pid` so far, from `/proc/PID/stat`.
    fn cpu_seconds(pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces), from field 3.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / TICKS_PER_SECOND)
    }

    /// The machine's 1-minute load average.
    fn load_average() -> Option<f64> {
        std::fs::read_to_string("/proc/loadavg")
            .ok()?
            .split(' ')
            .next()?
            .parse()
            .ok()
    }

    /// Bytes of the files under `dir` (the ledger folder), or `None`.
    fn disk_bytes(dir: &Option<String>) -> Option<u64> {
        let mut total = 0;
        let mut pending = vec![std::path::PathBuf::from(dir.as_ref()?)];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d).ok()?.flatten() {
                let meta = entry.metadata().ok()?;
                if meta.is_dir() {
                    pending.push(entry.path());
                } else {
                    total += meta.len();
                }
            }
        }
        Some(total)
    }

    /// The producer's count of events sent so far (a number in a file).
    fn sent(path: &Option<String>) -> Option<u64> {
        let text = std::fs::read_to_string(path.as_ref()?).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// The deals to query, each with the number of events that must be
    /// ingested before it exists (the line of the events file that opens
    /// it), in that order; the first `ready` of them are queried.
    struct Deals {
        ids: Vec<(u64, String)>,
        ready: AtomicUsize,
    }

    impl Deals {
        /// `QUERY_DEALS_FILE` (`ID` or `LINE<TAB>ID` per line), or every
        /// listed deal (all ready).
        async fn load(target: &'static Target) -> Self {
            let mut ids: Vec<(u64, String)> = if let Ok(path) = std::env::var("QUERY_DEALS_FILE") {
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read QUERY_DEALS_FILE {path}: {e}"));
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .take(MAX_DEAL_IDS)
                    .map(|l| match l.split_once('\t') {
                        Some((line, id)) => (
                            line.parse().unwrap_or_else(|_| {
                                panic!("QUERY_DEALS_FILE {path}: {line:?} is not a line number")
                            }),
                            id.to_string(),
                        ),
                        None => (0, l.to_string()),
                    })
                    .collect()
            } else {
                let mut client = target.connect().await;
                super::list_deals(target, &mut client)
                    .await
                    .into_iter()
                    .map(|id| (0, id))
                    .collect()
            };
            ids.sort_by_key(|(line, _)| *line);
            println!("{} deal ids", ids.len());
            Deals {
                ids,
                ready: AtomicUsize::new(0),
            }
        }

        /// Makes every deal opened within the first `ingested` events
        /// queryable; returns how many are.
        fn catch_up(&self, ingested: f64) -> usize {
            let ready = self
                .ids
                .partition_point(|(line, _)| (*line as f64) <= ingested);
            self.ready.fetch_max(ready, Ordering::Relaxed).max(ready)
        }

        /// A queryable deal, chosen by `random`.
        fn pick(&self, random: u64) -> &str {
            let ready = self.ready.load(Ordering::Relaxed);
            assert!(ready > 0, "no deal is queryable yet");
            &self.ids[(random % ready as u64) as usize].1
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }

    /// Least-squares slope of `y` over `x`.
    fn slope(points: &[(f64, f64)]) -> Option<f64> {
        if points.len() < 2 {
            return None;
        }
        let n = points.len() as f64;
        let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
        let my = points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        (sxx > 0.0).then(|| sxy / sxx)
    }

    fn print_header(config: &Config) {
        println!(
            "soak: {} s, one line per {} s; queries {} req/s in all ({} in turn) over {} connections, latency from each request's scheduled start",
            config.seconds,
            config.interval,
            config.rate,
            ROUTES.join(", "),
            config.connections
        );
        println!();
        println!(
            "{:>6} {:>10} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>7} {:>6} {:>4} {:>4} {:>7} {:>7} {:>8}  p99 ms per route (deal/history/locks)  KiB per answer",
            "min",
            "ingested",
            "ingest/s",
            "sent/s",
            "lag",
            "RSS MiB",
            "peak MiB",
            "anon MiB",
            "disk MiB",
            "CPU %",
            "load",
            "deals",
            "reqs",
            "err",
            "404",
            "p50 ms",
            "p99 ms",
            "max ms",
        );
    }

    fn print_row(row: &Row, previous: Option<&Row>) {
        let dt = previous.map(|p| row.seconds - p.seconds).unwrap_or(0.0);
        let per_s = |now: f64, before: f64| {
            if dt > 0.0 {
                format!("{:.0}", (now - before) / dt)
            } else {
                "-".to_string()
            }
        };
        let ingest_rate = previous
            .map(|p| per_s(row.scrape.ingested, p.scrape.ingested))
            .unwrap_or_else(|| "-".into());
        let sent_rate = match (row.sent, previous.and_then(|p| p.sent)) {
            (Some(now), Some(before)) => per_s(now as f64, before as f64),
            _ => "-".into(),
        };
        let lag = row
            .scrape
            .lag
            .map(|l| format!("{l:.0}"))
            .unwrap_or_else(|| "-".into());
        let (rss, hwm, anon) = match row.memory {
            Some(m) => (
                format!("{:.1}", mib(m.rss_kib)),
                format!("{:.1}", mib(m.hwm_kib)),
                format!("{:.1}", mib(m.anon_kib)),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let cpu = match (row.memory, previous.and_then(|p| p.memory)) {
            (Some(now), Some(before)) if dt > 0.0 => {
                format!("{:.0}", (now.cpu_seconds - before.cpu_seconds) / dt * 100.0)
            }
            _ => "-".into(),
        };
        let load = row
            .load
            .map(|l| format!("{l:.1}"))
            .unwrap_or_else(|| "-".into());
        let disk = row
            .disk_bytes
            .map(|b| format!("{:.0}", b as f64 / 1_048_576.0))
            .unwrap_or_else(|| "-".into());
        let (p50, p99, max, routes) = if row.requests > 0 {
            (
                format!("{:.2}", ms(row.p50)),
                format!("{:.2}", ms(row.p99)),
                format!("{:.2}", ms(row.max)),
                format!(
                    "{:.2} / {:.2} / {:.2}  {:.1} / {:.1} / {:.1}",
                    ms(row.route_p99[0]),
                    ms(row.route_p99[1]),
                    ms(row.route_p99[2]),
                    row.route_kib[0],
                    row.route_kib[1],
                    row.route_kib[2]
                ),
            )
        } else {
            ("-".into(), "-".into(), "-".into(), "-".into())
        };
        println!(
            "{:>6.1} {:>10.0} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>7} {:>6} {:>4} {:>4} {:>7} {:>7} {:>8}  {}",
            row.seconds / 60.0,
            row.scrape.ingested,
            ingest_rate,
            sent_rate,
            lag,
            rss,
            hwm,
            anon,
            disk,
            cpu,
            load,
            row.deals,
            row.requests,
            row.errors,
            row.not_found,
            p50,
            p99,
            max,
            routes
        );
    }

    /// The closing figures: RSS growth at the start and at the end, RSS
    /// slope, p99 drift.
    fn print_verdict(rows: &[Row]) {
        println!();
        let intervals = rows.len() - 1;
        if intervals < 2 {
            println!("verdict: too few intervals ({intervals}) to compare start and end");
            return;
        }
        let edge = EDGE_INTERVALS.min(intervals / 2).max(1);
        let minutes = |r: &Row| r.seconds / 60.0;
        let memory: Vec<(f64, Memory, f64)> = rows
            .iter()
            .filter_map(|r| r.memory.map(|m| (minutes(r), m, r.scrape.ingested)))
            .collect();
        if memory.len() == rows.len() {
            let growth = |a: usize, b: usize| {
                let kib = memory[b].1.rss_kib as f64 - memory[a].1.rss_kib as f64;
                let events = memory[b].2 - memory[a].2;
                let per_event = if events > 0.0 {
                    format!("{:.0} bytes per event ingested", kib * 1024.0 / events)
                } else {
                    "no events ingested".to_string()
                };
                (kib / 1024.0, per_event)
            };
            let (first, first_per) = growth(0, edge);
            let (last, last_per) = growth(intervals - edge, intervals);
            println!(
                "RSS: {:.1} MiB at the start, {:.1} MiB at the end, peak {:.1} MiB",
                mib(memory[0].1.rss_kib),
                mib(memory[intervals].1.rss_kib),
                mib(memory[intervals].1.hwm_kib)
            );
            println!("RSS growth, first {edge} intervals: {first:+.1} MiB ({first_per})");
            println!("RSS growth, last {edge} intervals:  {last:+.1} MiB ({last_per})");
            if first.abs() > f64::EPSILON {
                println!(
                    "last/first growth: {:.2} (well under 1: levelling off; about 1: steady growth)",
                    last / first
                );
            }
            let all: Vec<(f64, f64)> = memory
                .iter()
                .map(|(m, mem, _)| (*m, mib(mem.rss_kib)))
                .collect();
            let half = &all[all.len() / 2..];
            println!(
                "RSS slope: {:+.2} MiB/min over the whole run, {:+.2} MiB/min over the second half",
                slope(&all).unwrap_or(0.0),
                slope(half).unwrap_or(0.0)
            );
            let per_min: Vec<String> = all
                .windows(2)
                .map(|w| format!("{:+.1}", (w[1].1 - w[0].1) / (w[1].0 - w[0].0)))
                .collect();
            println!("RSS change per interval, MiB/min: {}", per_min.join(" "));
        } else {
            println!("RSS: not measured (no SOAK_PID, or its /proc status was unreadable)");
        }
        let queried = &rows[1..];
        let mean_p99 = |rs: &[Row]| rs.iter().map(|r| ms(r.p99)).sum::<f64>() / rs.len() as f64;
        let first = mean_p99(&queried[..edge]);
        let last = mean_p99(&queried[queried.len() - edge..]);
        println!(
            "query p99, mean of the first {edge} intervals: {first:.2} ms; of the last {edge}: {last:.2} ms; last/first {:.2}",
            if first > 0.0 { last / first } else { 0.0 }
        );
        let p99s: Vec<(f64, f64)> = queried.iter().map(|r| (minutes(r), ms(r.p99))).collect();
        println!(
            "query p99 slope: {:+.3} ms/min; per route, first -> last {edge} intervals: {}",
            slope(&p99s).unwrap_or(0.0),
            (0..ROUTES.len())
                .map(|route| {
                    let mean = |rs: &[Row]| {
                        rs.iter().map(|r| ms(r.route_p99[route])).sum::<f64>() / rs.len() as f64
                    };
                    let kib = |rs: &[Row]| {
                        rs.iter().map(|r| r.route_kib[route]).sum::<f64>() / rs.len() as f64
                    };
                    format!(
                        "{} {:.2} -> {:.2} ms ({:.1} -> {:.1} KiB per answer)",
                        ROUTES[route],
                        mean(&queried[..edge]),
                        mean(&queried[queried.len() - edge..]),
                        kib(&queried[..edge]),
                        kib(&queried[queried.len() - edge..])
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        let errors: u64 = queried.iter().map(|r| r.errors).sum();
        let not_found: u64 = queried.iter().map(|r| r.not_found).sum();
        let requests: usize = queried.iter().map(|r| r.requests).sum();
        println!("queries: {requests} answered, {errors} errors, {not_found} not found");
    }

    /// Soak mode's entry point.
    pub async fn run(base: String) {
        let config = Config::from_env();
        let target = super::target_from(&base);
        let deals: &'static Deals = Box::leak(Box::new(Deals::load(target).await));
        let at: &'static str = Box::leak(config.at.clone().into_boxed_str());
        let mut metrics_client = target.connect().await;
        let first = scrape(target, &mut metrics_client).await;
        let ready = deals.catch_up(first.ingested);
        assert!(
            ready > 0,
            "no deal is opened by the {} events ingested",
            first.ingested
        );
        println!(
            "{ready} of them opened by the {} events ingested so far",
            first.ingested
        );
        // Brings the deals queried up to the events ingested, every second.
        let refresher = tokio::spawn(async move {
            let mut client = target.connect().await;
            loop {
                tokio::time::sleep(DEALS_REFRESH).await;
                deals.catch_up(scrape(target, &mut client).await.ingested);
            }
        });

        print_header(&config);
        let window = Arc::new(Mutex::new(Window::default()));
        let t0 = Instant::now();
        let mut rows = vec![Row {
            seconds: 0.0,
            scrape: first,
            sent: sent(&config.produced_file),
            memory: config.pid.and_then(memory),
            disk_bytes: disk_bytes(&config.data_dir),
            load: load_average(),
            deals: ready,
            requests: 0,
            errors: 0,
            not_found: 0,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            max: Duration::ZERO,
            route_p99: [Duration::ZERO; 3],
            route_kib: [0.0; 3],
        }];
        print_row(&rows[0], None);

        let start = t0 + Duration::from_millis(100);
        let end = start + Duration::from_secs(config.seconds);
        let mut lanes = Vec::new();
        for c in 0..config.connections {
            let lane = Lane {
                target,
                deals,
                at,
                c,
                connections: config.connections,
                rate: config.rate,
                start,
                end,
                window: Arc::clone(&window),
            };
            lanes.push(tokio::spawn(lane.run()));
        }

        let intervals = config.seconds.div_ceil(config.interval);
        for k in 1..=intervals {
            let boundary = (start + Duration::from_secs(k * config.interval)).min(end);
            tokio::time::sleep_until(boundary.into()).await;
            if k == intervals {
                // The last interval includes the requests still in flight at the end.
                for lane in lanes.drain(..) {
                    lane.await.expect("load task");
                }
            }
            let w = std::mem::take(&mut *window.lock().unwrap_or_else(|e| e.into_inner()));
            let mut all: Vec<Duration> = w.latencies.iter().flatten().copied().collect();
            all.sort_unstable();
            let route_p99 = std::array::from_fn(|r| {
                let mut l = w.latencies[r].clone();
                l.sort_unstable();
                percentile(&l, 99.0)
            });
            let route_kib = std::array::from_fn(|r| {
                w.bytes[r] as f64 / 1024.0 / w.latencies[r].len().max(1) as f64
            });
            let row = Row {
                seconds: t0.elapsed().as_secs_f64(),
                scrape: scrape(target, &mut metrics_client).await,
                sent: sent(&config.produced_file),
                memory: config.pid.and_then(memory),
                disk_bytes: disk_bytes(&config.data_dir),
                load: load_average(),
                deals: deals.ready.load(Ordering::Relaxed),
                requests: all.len(),
                errors: w.errors,
                not_found: w.not_found,
                p50: percentile(&all, 50.0),
                p99: percentile(&all, 99.0),
                max: all.last().copied().unwrap_or_default(),
                route_p99,
                route_kib,
            };
            print_row(&row, rows.last());
            rows.push(row);
        }
        refresher.abort();
        print_verdict(&rows);
    }
}
