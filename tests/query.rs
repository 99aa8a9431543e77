//! The compliance queries end to end: the example scenario (and its variant
//! finalized under Microsoft's exclusive lock) produced to the real broker,
//! ingested, and asked with the CLI offline (`--data`) and against the
//! running daemon (`--server`), which must give identical JSON.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{create_topic, dealledger, describe, repo_file, unique_topic};

const TOKEN: &str = "query-test-token-0123456789";

/// A topic holding the events of `file`, ingested into a fresh ledger.
fn ledger_of(file: &str, name: &str) -> (tempfile::TempDir, String) {
    let topic = unique_topic(name);
    create_topic(&topic, 3);
    let path = repo_file(file);
    let out = dealledger(
        &["produce", "--topic", &topic, path.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let dir = tempfile::tempdir().unwrap();
    let out = dealledger(
        &[
            "ingest",
            "--until-caught-up",
            "--topic",
            &topic,
            "--data",
            dir.path().to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    (dir, topic)
}

/// Runs a query command offline and parses its JSON.
fn offline(data: &Path, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "--data", data.to_str().unwrap()]);
    let out = dealledger(&all, None);
    assert!(out.status.success(), "{:?}: {}", args, describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_scenario_answers_as_history_says_and_its_variant_yields_one_finding() {
    let (data, _) = ledger_of("schemas/examples/scenario.jsonl", "query-scenario");
    let data = data.path();

    let google = offline(data, &["deal", "show", "google-openai-2025"]);
    assert_eq!(google["status"], "finalized");
    assert_eq!(google["finalized"]["at"], "2025-05-28T15:00:00Z");
    assert_eq!(google["parties"]["customer"], "openai");
    let cited = &google["finalized"]["entry"];
    assert_eq!(cited["hash"].as_str().unwrap().len(), 64, "{google:#}");

    let findings = offline(data, &["findings"]);
    assert_eq!(findings["items"], Value::Array(vec![]), "{findings:#}");

    let lock_ids = |at: &str| -> Vec<String> {
        let locks = offline(data, &["locks", "active", "--at", at]);
        locks["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{}/{}",
                    l["deal_id"].as_str().unwrap(),
                    l["lock_id"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert!(lock_ids("2024-12-31").contains(&"msft-openai-2019/azure-exclusive".to_string()));
    assert!(!lock_ids("2025-02-01").contains(&"msft-openai-2019/azure-exclusive".to_string()));

    let history = offline(data, &["deal", "history", "google-openai-2025"]);
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    assert!(items.iter().all(|h| h["verdict"] == "accepted"));

    let (variant, _) = ledger_of(
        "schemas/examples/finalized-under-lock.jsonl",
        "query-variant",
    );
    let findings = offline(variant.path(), &["findings"]);
    let items = findings["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{findings:#}");
    let f = &items[0];
    assert_eq!(f["kind"], "finalized_during_exclusive_lock");
    assert_eq!(
        f["deals"],
        serde_json::json!(["google-openai-2025", "msft-openai-2019"])
    );
    assert_eq!(f["lock"], "msft-openai-2019/azure-exclusive");
    assert_eq!(f["entries"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_query_arguments_exit_2_naming_the_parameter() {
    let (data, _) = ledger_of("schemas/examples/scenario.jsonl", "query-bad");
    let data = data.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["deals", "list", "--status", "open"], "status"),
        (vec!["findings", "--kind", "nope"], "kind"),
        (vec!["findings", "--max-backdate", "soon"], "max_backdate"),
        (vec!["deals", "list", "--limit", "0"], "limit"),
    ] {
        let mut all = args.clone();
        all.extend(["--data", data]);
        let out = dealledger(&all, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = dealledger(&["deal", "show", "no-such-deal", "--data", data], None);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-deal"));
}

/// A `dealledger serve` child, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(topic: &str, data: &Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args([
            "serve",
            "--brokers",
            crate::common::bootstrap(),
            "--topic",
            topic,
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DEALLEDGER_API_TOKENS", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        assert!(Instant::now() < deadline, "serve did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_cli_against_the_server_and_offline_print_identical_json() {
    let (dir, topic) = ledger_of("schemas/examples/finalized-under-lock.jsonl", "query-same");
    let queries: Vec<Vec<&str>> = vec![
        vec!["deal", "show", "google-openai-2025"],
        vec!["deal", "history", "msft-openai-2019"],
        vec!["deals", "list"],
        vec![
            "deals",
            "list",
            "--party",
            "openai",
            "--status",
            "finalized",
        ],
        vec!["locks", "active", "--at", "2024-12-31"],
        vec!["findings"],
        vec!["findings", "--max-backdate", "30d", "--from", "2025-01-01"],
        vec!["stats"],
        vec!["deals", "list", "--limit", "2"],
    ];
    let expected: Vec<Vec<u8>> = queries
        .iter()
        .map(|q| {
            let mut all = q.clone();
            all.extend(["--json", "--data", dir.path().to_str().unwrap()]);
            let out = dealledger(&all, None);
            assert!(out.status.success(), "{q:?}: {}", describe(&out));
            out.stdout
        })
        .collect();

    let server = serve(&topic, dir.path());
    for (q, expected) in queries.iter().zip(expected) {
        let mut all = q.clone();
        all.extend(["--json", "--server", &server.url]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let out = Command::new(env!("CARGO_BIN_EXE_dealledger"))
                .args(&all)
                .env("DEALLEDGER_TOKEN", TOKEN)
                .output()
                .unwrap();
            // The daemon may still be loading its state when it first listens.
            if out.status.success() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(out.status.success(), "{q:?}: {}", describe(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&expected),
            "{q:?}"
        );
    }
    // Without the token: refused, with a hint.
    let out = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args(["findings", "--server", &server.url])
        .env_remove("DEALLEDGER_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        describe(&out)
    );
}
