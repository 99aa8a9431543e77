//! The HTTP query API of `dealledger serve`, against a real daemon ingesting
//! from the real broker: bearer tokens and scopes, every route's answer
//! (byte for byte the serde serialization of the same query run offline on
//! the stopped ledger), cursor pagination, parameter errors, the streamed
//! export, TLS, and schemathesis against docs/openapi.json.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dealledger::event::Id;
use dealledger::query::{self, DealFilter, FindingFilter, PageRequest};
use dealledger::store::Store;
use serde_json::Value;

use crate::common::{bootstrap, create_topic, dealledger, describe, repo_file, unique_topic};

/// A token allowed every route (from the tokens file).
const ADMIN: &str = "admin-token-0123456789abcdef";
/// A token allowed only `deals` and `locks` (from the tokens file).
const DASHBOARD: &str = "dashboard-token-0123456789";
/// A token from DEALLEDGER_API_TOKENS.
const ENV_TOKEN: &str = "env-token-abcdefghijklmnop";

/// Events of the example scenario.
const SCENARIO_EVENTS: u64 = 41;

/// Longest wait for the daemon to start and ingest the scenario.
const STARTUP: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `dealledger serve`, killed on drop.
struct Daemon {
    child: Child,
    base: String,
    agent: ureq::Agent,
    topic: String,
    data: tempfile::TempDir,
    stderr_path: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer: status, headers we look at, body.
struct Reply {
    status: u16,
    www_authenticate: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn plain_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn tls_agent(ca_pem: &Path) -> ureq::Agent {
    let pem = std::fs::read(ca_pem).unwrap();
    let ca = ureq::tls::Certificate::from_pem(&pem).unwrap();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
                .build(),
        )
        .build()
        .into()
}

fn get_with(agent: &ureq::Agent, url: &str, token: Option<&str>) -> Result<Reply, ureq::Error> {
    let mut request = agent.get(url);
    if let Some(t) = token {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let mut response = request.call()?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let www_authenticate = header("www-authenticate");
    let content_type = header("content-type");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_vec()?;
    Ok(Reply {
        status,
        www_authenticate,
        content_type,
        body,
    })
}

impl Daemon {
    /// Starts `serve` on a fresh ledger of `topic` with `args` (tokens, TLS)
    /// and `envs`; `scheme` is http or https.
    fn start(
        topic: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        scheme: &str,
        agent: ureq::Agent,
    ) -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let stderr_path = data.path().with_extension("stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_dealledger"));
        command
            .args([
                "serve", "--topic", topic, "--group", topic, "--listen", &listen,
            ])
            .arg("--data")
            .arg(data.path().join("ledger"))
            .args(args)
            .env("DEALLEDGER_BROKERS", bootstrap())
            .env_remove("DEALLEDGER_API_TOKENS")
            .env_remove("DEALLEDGER_TOKENS_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn dealledger serve");
        Daemon {
            child,
            base: format!("{scheme}://localhost:{port}"),
            agent,
            topic: topic.to_string(),
            data,
            stderr_path,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn get(&self, path: &str, token: Option<&str>) -> Reply {
        get_with(&self.agent, &format!("{}{path}", self.base), token)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n--- serve stderr\n{}", self.stderr()))
    }

    /// Waits until the daemon answers and has ingested `entries` entries.
    fn wait_for_entries(&mut self, token: &str, entries: u64) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                panic!("serve exited with {exit:?}\n{}", self.stderr());
            }
            if let Ok(reply) = get_with(
                &self.agent,
                &format!("{}/v1/stats?limit=1", self.base),
                Some(token),
            ) && reply.status == 200
                && reply.json()["overall"]["entries"].as_u64() == Some(entries)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not ingest {entries} entries in {STARTUP:?}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                assert!(
                    exit.success(),
                    "serve exited with {exit:?}\n{}",
                    self.stderr()
                );
                return;
            }
            assert!(Instant::now() < deadline, "serve did not stop in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ledger_dir(&self) -> PathBuf {
        self.data.path().join("ledger")
    }
}

fn scenario_topic(name: &str) -> String {
    let topic = unique_topic(name);
    create_topic(&topic, 3);
    let file = repo_file("schemas/examples/scenario.jsonl");
    let out = dealledger(
        &["produce", "--topic", &topic, file.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    topic
}

fn tokens_file(dir: &Path) -> PathBuf {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!("# test tokens\n{ADMIN}\n\n{DASHBOARD} allow=deals,locks\n"),
    )
    .unwrap();
    path
}

/// Walks every page of `path` (which has no query string of its own
/// besides those in `query`) with `limit`, returning the items.
fn walk(d: &Daemon, path: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut url = format!("{path}?limit={limit}{query}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={}", encode(c)));
        }
        let reply = d.get(&url, Some(ADMIN));
        assert_eq!(reply.status, 200, "{url}: {}", reply.text());
        let page = reply.json();
        let page = if path == "/v1/stats" {
            page["deals"].clone()
        } else {
            page
        };
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit, "{url}: {} items", got.len());
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            None => return items,
            Some(c) => {
                assert!(!got.is_empty(), "{url}: an empty page with a cursor");
                cursor = Some(c.to_string());
            }
        }
    }
    panic!("{path}: more than 10,000 pages");
}

fn encode(s: &str) -> String {
    serde_urlencoded::to_string([("", s)]).unwrap()[1..].to_string()
}

/// The body of a 400, checked to name `parameter`.
fn assert_bad_parameter(d: &Daemon, url: &str, parameter: &str) {
    let reply = d.get(url, Some(ADMIN));
    assert_eq!(reply.status, 400, "{url}: {}", reply.text());
    let body = reply.json();
    assert_eq!(body["parameter"], parameter, "{url}: {body}");
    assert!(
        body["error"].as_str().unwrap().contains(parameter),
        "{url}: {body}"
    );
}

#[test]
fn query_api_answers_with_tokens_pages_and_offline_identical_json() {
    let topic = scenario_topic("api");
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let mut d = Daemon::start(
        &topic,
        &["--tokens-file", tokens.to_str().unwrap()],
        &[("DEALLEDGER_API_TOKENS", ENV_TOKEN)],
        "http",
        plain_agent(),
    );
    d.wait_for_entries(ADMIN, SCENARIO_EVENTS);

    // --- Authentication and scopes.
    let reply = d.get("/v1/deals", None);
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert!(
        reply
            .www_authenticate
            .as_deref()
            .unwrap_or("")
            .starts_with("Bearer"),
        "401 without WWW-Authenticate: Bearer"
    );
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("bearer token")
    );
    let reply = d.get("/v1/deals", Some("wrong-token-0123456789abcdef"));
    assert_eq!(reply.status, 401);
    assert!(!reply.text().contains("wrong-token"), "the token is echoed");
    assert_eq!(d.get("/v1/openapi.json", None).status, 401);
    assert_eq!(d.get("/v1/nope", None).status, 401);
    for path in [
        "/v1/deals",
        "/v1/deals/stargate-2025",
        "/v1/locks/active?at=2025-01-01",
    ] {
        assert_eq!(d.get(path, Some(DASHBOARD)).status, 200, "{path}");
    }
    for path in [
        "/v1/deals/stargate-2025/history",
        "/v1/findings",
        "/v1/stats",
        "/v1/export",
    ] {
        let reply = d.get(path, Some(DASHBOARD));
        assert_eq!(reply.status, 403, "{path}: {}", reply.text());
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .contains("not allowed")
        );
    }
    assert_eq!(d.get("/v1/openapi.json", Some(DASHBOARD)).status, 200);
    assert_eq!(d.get("/v1/stats", Some(ENV_TOKEN)).status, 200);
    assert_eq!(d.get("/v1/nope", Some(ADMIN)).status, 404);
    // /health and /metrics stay open by default.
    assert_eq!(d.get("/metrics", None).status, 200);
    assert!(d.get("/health", None).status != 401);
    assert!(
        !d.stderr().contains(ADMIN) && !d.stderr().contains(ENV_TOKEN),
        "a token was logged"
    );

    // --- The OpenAPI document is the repository's.
    let reply = d.get("/v1/openapi.json", Some(ADMIN));
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let served = reply.json();
    let repo: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file("docs/openapi.json")).unwrap())
            .unwrap();
    assert_eq!(served, repo);

    // --- Pagination: limit=2 walks every item exactly once, in the order of
    // one big page.
    let all_deals = d.get("/v1/deals?limit=1000", Some(ADMIN)).json();
    assert!(all_deals["next_cursor"].is_null());
    let all_deals = all_deals["items"].as_array().unwrap().clone();
    assert_eq!(all_deals.len(), 5);
    assert_eq!(walk(&d, "/v1/deals", "", 2), all_deals);
    let ids: Vec<String> = all_deals
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect();
    let mut history_total = 0;
    for id in &ids {
        let path = format!("/v1/deals/{id}/history");
        let big = d.get(&format!("{path}?limit=1000"), Some(ADMIN)).json();
        let big = big["items"].as_array().unwrap().clone();
        let walked = walk(&d, &path, "", 2);
        assert_eq!(walked, big, "{path}");
        let positions: Vec<u64> = walked
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect();
        assert_eq!(positions, (0..walked.len() as u64).collect::<Vec<_>>());
        history_total += walked.len();
    }
    assert_eq!(history_total as u64, SCENARIO_EVENTS);
    let big_stats = d.get("/v1/stats?limit=1000", Some(ADMIN)).json();
    assert_eq!(
        walk(&d, "/v1/stats", "", 2),
        big_stats["deals"]["items"].as_array().unwrap().clone()
    );
    let locks = walk(&d, "/v1/locks/active", "&at=2019-08-01", 1);
    let lock_keys: BTreeSet<String> = locks
        .iter()
        .map(|l| format!("{}/{}", l["deal_id"], l["lock_id"]))
        .collect();
    assert_eq!(lock_keys.len(), locks.len(), "a lock was returned twice");
    assert!(!locks.is_empty(), "no lock in force on 2019-08-01");
    let findings_all = d.get("/v1/findings?limit=1000", Some(ADMIN)).json();
    assert_eq!(
        walk(&d, "/v1/findings", "", 1),
        findings_all["items"].as_array().unwrap().clone()
    );

    // --- Filters.
    let finalized = d
        .get("/v1/deals?status=finalized&limit=1000", Some(ADMIN))
        .json();
    assert!(
        finalized["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["status"] == "finalized")
    );
    let show = d.get("/v1/deals/msft-openai-2019", Some(ADMIN));
    assert_eq!(show.status, 200);
    assert_eq!(show.content_type.as_deref(), Some("application/json"));
    assert_eq!(show.json()["id"], "msft-openai-2019");

    // --- Malformed parameters: 400 naming the parameter.
    for (url, parameter) in [
        ("/v1/deals?limit=abc", "limit"),
        ("/v1/deals?limit=0", "limit"),
        ("/v1/deals?limit=100000", "limit"),
        ("/v1/deals?limit=-1", "limit"),
        ("/v1/deals?cursor=", "cursor"),
        ("/v1/deals?status=bogus", "status"),
        ("/v1/deals?party=not%20an%20id", "party"),
        ("/v1/deals?from=yesterday", "from"),
        ("/v1/deals?from=2025-01-02&to=2025-01-01", "to"),
        ("/v1/deals?colour=red", "colour"),
        ("/v1/deals?limit=1&limit=2", "limit"),
        ("/v1/deals/stargate-2025/history?cursor=xyz", "cursor"),
        ("/v1/deals/stargate-2025?limit=1", "limit"),
        ("/v1/deals/bad%20id", "id"),
        ("/v1/deals/bad%20id/history", "id"),
        ("/v1/locks/active", "at"),
        ("/v1/locks/active?at=2025-13-01", "at"),
        ("/v1/findings?kind=bogus", "kind"),
        ("/v1/findings?max_backdate=3x", "max_backdate"),
        ("/v1/findings?max_backdate=36", "max_backdate"),
        ("/v1/stats?limit=zero", "limit"),
        ("/v1/export?x=1", "x"),
    ] {
        assert_bad_parameter(&d, url, parameter);
    }
    let reply = d.get("/v1/deals/no-such-deal", Some(ADMIN));
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("no-such-deal")
    );
    assert_eq!(
        d.get("/v1/deals/no-such-deal/history", Some(ADMIN)).status,
        404
    );
    let reply = d.get("/v1/findings?max_backdate=36h&kind=backdated", Some(ADMIN));
    assert_eq!(reply.status, 200, "{}", reply.text());

    // --- Every answer, kept to compare with the offline queries.
    let mut answers: Vec<(String, Vec<u8>)> = Vec::new();
    let mut keep = |url: String| {
        let reply = d.get(&url, Some(ADMIN));
        assert_eq!(reply.status, 200, "{url}: {}", reply.text());
        answers.push((url, reply.body));
    };
    keep("/v1/deals".into());
    keep("/v1/deals?limit=2".into());
    keep("/v1/deals?party=openai&status=finalized".into());
    keep("/v1/deals?from=2025-01-01&to=2026-01-01".into());
    for id in &ids {
        keep(format!("/v1/deals/{id}"));
        keep(format!("/v1/deals/{id}/history"));
        keep(format!("/v1/deals/{id}/history?limit=3"));
    }
    keep("/v1/locks/active?at=2019-08-01".into());
    keep("/v1/locks/active?at=2025-06-01T00:00:00Z&limit=1".into());
    keep("/v1/findings".into());
    keep("/v1/findings?max_backdate=1d".into());
    keep("/v1/findings?kind=producer_rejections&from=2019-01-01".into());
    keep("/v1/stats".into());
    keep("/v1/stats?limit=2".into());

    // --- The export, streamed, verifies and holds every entry.
    let export = d.get("/v1/export", Some(ADMIN));
    assert_eq!(export.status, 200);
    assert_eq!(
        export.content_type.as_deref(),
        Some("application/octet-stream")
    );
    let export_file = dir.path().join("api.dlx");
    std::fs::write(&export_file, &export.body).unwrap();
    let out = dealledger(
        &[
            "verify",
            "--export",
            export_file.to_str().unwrap(),
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["entries"], SCENARIO_EVENTS, "{report}");

    // --- Offline, on the stopped ledger: the very same bytes.
    d.stop();
    let store = Store::open_existing(&d.ledger_dir()).expect("open the ledger");
    let state = store.load_state().expect("load the state");
    let page = |limit: Option<usize>| PageRequest {
        limit,
        cursor: None,
    };
    let time = |s: &str| dealledger::replay::parse_time(s).unwrap();
    for (url, body) in &answers {
        let (path, q) = url.split_once('?').unwrap_or((url, ""));
        let params: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap();
        let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let limit = param("limit").map(|l| l.parse().unwrap());
        let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        let offline = match parts.as_slice() {
            ["deals"] => serde_json::to_vec(
                &query::deals_list(
                    &state,
                    &DealFilter {
                        party: param("party").map(|p| Id::new(p).unwrap()),
                        status: param("status").map(|s| query::parse_status(&s).unwrap()),
                        from: param("from").map(|t| time(&t)),
                        to: param("to").map(|t| time(&t)),
                    },
                    &page(limit),
                )
                .unwrap(),
            ),
            ["deals", id] => {
                serde_json::to_vec(&query::deal_show(&state, &Id::new(*id).unwrap()).unwrap())
            }
            ["deals", id, "history"] => serde_json::to_vec(
                &query::deal_history(&state, &store, &Id::new(*id).unwrap(), &page(limit)).unwrap(),
            ),
            ["locks", "active"] => serde_json::to_vec(
                &query::locks_active(&state, time(&param("at").unwrap()), &page(limit)).unwrap(),
            ),
            ["findings"] => serde_json::to_vec(
                &query::findings(
                    &state,
                    &store,
                    &FindingFilter {
                        from: param("from").map(|t| time(&t)),
                        to: param("to").map(|t| time(&t)),
                        kind: param("kind"),
                        max_backdate_ms: param("max_backdate")
                            .map(|m| query::parse_duration_ms(&m).unwrap()),
                    },
                    &page(limit),
                )
                .unwrap(),
            ),
            ["stats"] => serde_json::to_vec(&query::stats(&state, &page(limit)).unwrap()),
            other => panic!("no offline query for {other:?}"),
        }
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&offline),
            "{url}: the server's answer differs from the offline query's"
        );
    }
    drop(store);
    let _ = &d.topic;
}

/// Makes a CA and a server certificate for localhost signed by it, in
/// `dir`: returns (ca.pem, server.pem, server.key, ca.key).
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (install it: apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=dealledger test CA",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&[
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.key"),
    )
}

#[test]
fn query_api_over_tls_keeps_bearer_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, wrong_key) = make_certificates(dir.path());

    // Unusable TLS files are refused at start, naming them.
    for (c, k, says) in [
        (&cert, &wrong_key, "cannot be used together"),
        (&dir.path().join("missing.pem"), &key, "missing.pem"),
        (&key, &key, "CERTIFICATE"),
    ] {
        let out = dealledger(
            &[
                "serve",
                "--data",
                dir.path().join("never").to_str().unwrap(),
                "--tls-cert",
                c.to_str().unwrap(),
                "--tls-key",
                k.to_str().unwrap(),
            ],
            None,
        );
        assert!(!out.status.success(), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "expected {says:?}: {stderr}");
    }

    let topic = scenario_topic("api-tls");
    let mut d = Daemon::start(
        &topic,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--protect-health",
        ],
        &[("DEALLEDGER_API_TOKENS", &format!("{ENV_TOKEN},{ADMIN}"))],
        "https",
        tls_agent(&ca),
    );
    d.wait_for_entries(ADMIN, SCENARIO_EVENTS);

    let reply = d.get("/v1/deals", None);
    assert_eq!(reply.status, 401);
    assert!(reply.www_authenticate.is_some());
    assert_eq!(
        d.get("/v1/deals", Some("wrong-token-0123456789abcdef"))
            .status,
        401
    );
    let reply = d.get("/v1/deals", Some(ENV_TOKEN));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["items"].as_array().unwrap().len(), 5);
    let reply = d.get("/v1/deals/google-openai-2025", Some(ADMIN));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["id"], "google-openai-2025");
    // --protect-health: /health and /metrics need a token too.
    assert_eq!(d.get("/metrics", None).status, 401);
    assert_eq!(d.get("/metrics", Some(ADMIN)).status, 200);

    // Plain HTTP to the TLS port gets no answer.
    let plain = d.base.replace("https://", "http://");
    let result = get_with(&plain_agent(), &format!("{plain}/v1/deals"), Some(ADMIN));
    assert!(
        result.is_err(),
        "plain HTTP to the TLS listener was answered with {}",
        result.map(|r| r.status).unwrap_or_default()
    );
    // A client that does not trust the certificate is refused.
    let result = get_with(&plain_agent(), &format!("{}/v1/deals", d.base), Some(ADMIN));
    assert!(result.is_err(), "an untrusted certificate was accepted");
    // The server still works after the failed handshakes.
    assert_eq!(d.get("/v1/stats", Some(ADMIN)).status, 200);
    d.stop();
}

/// schemathesis (ops/requirements.txt) against docs/openapi.json and a
/// daemon holding the example scenario: no server error, every answer as
/// documented (schema, status code, content type).
#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let pyenv = Command::new(repo_file("ops/pyenv"))
        .output()
        .expect("run ops/pyenv");
    assert!(
        pyenv.status.success(),
        "ops/pyenv failed: {}",
        String::from_utf8_lossy(&pyenv.stderr)
    );
    let python = PathBuf::from(String::from_utf8_lossy(&pyenv.stdout).trim());
    let st = python.with_file_name("st");

    let topic = scenario_topic("api-schemathesis");
    let mut d = Daemon::start(
        &topic,
        &[],
        &[("DEALLEDGER_API_TOKENS", ADMIN)],
        "http",
        plain_agent(),
    );
    d.wait_for_entries(ADMIN, SCENARIO_EVENTS);
    let out = Command::new(&st)
        .arg("run")
        .arg(repo_file("docs/openapi.json"))
        .args(["--url", &d.base.replace("localhost", "127.0.0.1")])
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,\
             content_type_conformance,response_headers_conformance,\
             negative_data_rejection,ignored_auth",
        ])
        .args(["--max-examples", "60", "--seed", "1", "--workers", "2"])
        .args(["--request-timeout", "10", "--generation-database", "none"])
        .arg("--no-color")
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(d.data.path())
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n--- serve stderr\n{}",
        d.stderr()
    );
    eprintln!("{text}");
    assert!(text.contains("passed"), "{text}");
    d.stop();
}
