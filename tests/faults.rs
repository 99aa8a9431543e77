//! Faults, each with real processes: a damaged ledger folder at start,
//! SIGKILL during export / import / rebuild, a broker absent at start, a
//! broker restarted during a sustained ingest, and a full disk.
//!
//! The broker tests start their OWN broker on another port (`OwnBroker`,
//! `ops/kafka/up` with `KAFKA_PORT`) and stop only that one; the shared
//! broker on 9092 is never stopped. The disk-full test mounts a small tmpfs
//! (root is needed; without it the test fails, it never passes silently).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dealledger::store::Store;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::common::{bootstrap, create_topic, describe, unique_topic};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The `dealledger` binary, talking to `brokers`.
fn bin(brokers: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dealledger"));
    command
        .env("DEALLEDGER_BROKERS", brokers)
        .env_remove("DEALLEDGER_DATA")
        .env_remove("DEALLEDGER_TOPIC")
        .env("RUST_BACKTRACE", "0");
    command
}

/// Runs `dealledger args` against `brokers` with optional stdin.
fn run_on(brokers: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child = bin(brokers)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dealledger");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    // A hung command (say, a deadlock on a damaged ledger) must fail the
    // test, not block the suite: a watchdog kills it after RUN_TIMEOUT.
    let pid = child.id().to_string();
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (finished, timed_out) = (finished.clone(), timed_out.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + RUN_TIMEOUT;
            while !finished.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() > deadline {
                    timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = Command::new("kill").args(["-9", &pid]).status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = child.wait_with_output().expect("wait for dealledger");
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    assert!(
        !timed_out.load(std::sync::atomic::Ordering::SeqCst),
        "dealledger {args:?} did not finish within {RUN_TIMEOUT:?} and was killed:\n{}",
        describe(&out)
    );
    out
}

/// Longest a command of these tests may run before it counts as hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `dealledger args` against the shared broker.
fn run(args: &[&str]) -> Output {
    run_on(bootstrap(), args, None)
}

fn expect_success(out: &Output) {
    assert!(out.status.success(), "{}", describe(out));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Generated events as JSONL.
fn generated(events: u64, seed: u64) -> Vec<u8> {
    let out = run(&[
        "generate",
        "--events",
        &events.to_string(),
        "--deals",
        "200",
        "--seed",
        &seed.to_string(),
    ]);
    expect_success(&out);
    out.stdout
}

/// Events of the shared fixture topic.
const FIXTURE_EVENTS: u64 = 20_000;

/// A topic on the shared broker with [`FIXTURE_EVENTS`] generated events in
/// three partitions, produced once per test run; tests only read it.
fn fixture_topic() -> &'static str {
    static TOPIC: OnceLock<String> = OnceLock::new();
    TOPIC.get_or_init(|| {
        let topic = unique_topic("faults");
        create_topic(&topic, 3);
        let out = run_on(
            bootstrap(),
            &["produce", "--topic", &topic, "-"],
            Some(&generated(FIXTURE_EVENTS, 11)),
        );
        expect_success(&out);
        topic
    })
}

/// Ingests `topic` (shared broker) into `data` until caught up.
fn ingest_fixture(data: &Path, batch_records: u32) {
    ingest_fixture_with(data, batch_records, &[]);
}

/// [`ingest_fixture`] with further `ingest` arguments.
fn ingest_fixture_with(data: &Path, batch_records: u32, more: &[&str]) {
    let batch_records = batch_records.to_string();
    let mut args = vec![
        "ingest",
        "--until-caught-up",
        "--no-dead-letter",
        "--topic",
        fixture_topic(),
        "--data",
        path(data),
        "--batch-records",
        &batch_records,
    ];
    args.extend_from_slice(more);
    expect_success(&run(&args));
}

/// (partition, entries, head hash) of every stream of a ledger folder.
fn heads(data: &Path) -> Vec<(i32, u64, String)> {
    let store = Store::open_existing(data).expect("open ledger");
    store
        .heads()
        .unwrap()
        .iter()
        .map(|h| (h.stream().partition, h.next_seq(), h.head().to_string()))
        .collect()
}

/// `dealledger verify --data DIR` exits 0.
fn assert_verifies(data: &Path) {
    let out = run(&["verify", "--data", path(data)]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// The ledger holds every offset 0..high watermark of every partition
/// exactly once, in order, every batch record covers whole entries, and
/// every chain verifies (also through the binary).
fn assert_exactly_once(data: &Path, watermarks: &[(i32, i64)]) {
    {
        let store = Store::open_existing(data).expect("open ledger");
        for (partition, high) in watermarks {
            let offsets: Vec<i64> = store
                .entries(*partition, 0)
                .map(|e| e.expect("readable entry").record.offset)
                .collect();
            let expected: Vec<i64> = (0..*high).collect();
            assert!(
                offsets == expected,
                "partition {partition}: the ledger holds {} entries (first {:?}, last {:?}), the topic {high} offsets",
                offsets.len(),
                offsets.first(),
                offsets.last()
            );
        }
        let stored: u64 = store.heads().unwrap().iter().map(|h| h.next_seq()).sum();
        let in_batches: u64 = store
            .batches(0)
            .map(|b| b.expect("batch record").entry_count())
            .sum();
        assert_eq!(stored, in_batches, "entries outside any batch record");
        assert!(store.verify().unwrap().is_intact());
    }
    assert_verifies(data);
}

/// Copies a ledger folder (files and `blobs/`).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for item in fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            fs::copy(item.path(), &target).unwrap();
        }
    }
}

/// Deterministic bytes that are no sled data.
fn garbage(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The daemon's `/health` document, if it answers.
fn health(port: u16) -> Option<serde_json::Value> {
    let (_, body) = http_get(port, "/health")?;
    serde_json::from_str(&body).ok()
}

/// Entries the daemon wrote since it started (all verdicts), from `/metrics`.
fn events_ingested(port: u16) -> u64 {
    http_get(port, "/metrics")
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with("dealledger_events_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        })
        .unwrap_or(0)
}

/// A `dealledger serve` child with its log in a file.
struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    fn start(brokers: &str, topic: &str, data: &Path, log: PathBuf) -> Daemon {
        let port = free_port();
        let child = bin(brokers)
            .args([
                "serve",
                "--topic",
                topic,
                "--data",
                path(data),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--batch-records",
                "500",
                "--group",
                &format!("{topic}-group"),
            ])
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn serve");
        Daemon { child, port, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("serve exited with {status:?}:\n{}", self.log());
        }
    }

    /// Polls `/health` until `pred` holds (the daemon must stay up).
    fn wait_health(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            self.assert_running();
            if let Some(h) = health(self.port) {
                if pred(&h) {
                    return h;
                }
                last = Some(h);
            }
            assert!(
                Instant::now() < deadline,
                "/health never showed {what} within {limit:?}; last: {last:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop within 60 s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            exit.success(),
            "serve exited with {exit:?}:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_of(h: &serde_json::Value) -> &str {
    h["status"].as_str().unwrap_or("")
}

fn reasons_of(h: &serde_json::Value) -> String {
    h["reasons"].to_string()
}

// ---------------------------------------------------------------------------
// 1. A damaged ledger folder at start
// ---------------------------------------------------------------------------

/// Asserts a command failed cleanly on the damaged ledger `dir`: a non-zero
/// exit that is no panic, naming the folder and pointing to the rebuild.
fn assert_refused(case: &str, command: &str, out: &Output, dir: &Path) {
    let err = stderr(out);
    let context = format!("case {case:?}, `{command}`:\n{}", describe(out));
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("killed? {context}"));
    assert_ne!(code, 0, "{context}");
    assert_ne!(code, 101, "a panic exit: {context}");
    assert!(!err.contains("panicked"), "{context}");
    assert!(
        err.contains(path(dir)),
        "the folder is not named: {context}"
    );
    assert!(
        err.contains("dealledger rebuild --from-kafka"),
        "no pointer to the rebuild: {context}"
    );
}

/// Runs `serve` on a damaged ledger; it must exit by itself, quickly.
fn serve_once(topic: &str, data: &Path) -> Output {
    let port = free_port();
    let mut child = bin(bootstrap())
        .args([
            "serve",
            "--topic",
            topic,
            "--data",
            path(data),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve kept running on a damaged ledger:\n{}",
                describe(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_damaged_ledger_folder_is_refused_by_every_command_with_a_pointer_to_rebuild() {
    let topic = fixture_topic();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    // Full 10,000-record batches (the topic is produced already; a batch
    // waits up to 2 s to fill): each batch record lists 10,000 20-byte
    // identity fingerprints, so its sled node exceeds sled's 128 KiB blob
    // threshold and `blobs/` is not empty.
    ingest_fixture_with(&base, 10_000, &["--linger-ms", "2000"]);
    let blobs: Vec<PathBuf> = fs::read_dir(base.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        !blobs.is_empty(),
        "the fixture ledger has no sled blobs, so the blob cases would test nothing"
    );
    let db_len = fs::metadata(base.join("db")).unwrap().len() as usize;

    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "db truncated to 0 bytes",
            Box::new(|d| File::create(d.join("db")).map(drop).unwrap()),
        ),
        (
            "db cut in half",
            Box::new(move |d| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("db"))
                    .unwrap();
                f.set_len(db_len as u64 / 2).unwrap();
            }),
        ),
        (
            "db overwritten with garbage",
            Box::new(move |d| fs::write(d.join("db"), garbage(db_len, 1)).unwrap()),
        ),
        (
            "db deleted",
            Box::new(|d| fs::remove_file(d.join("db")).unwrap()),
        ),
        (
            "conf overwritten with garbage",
            Box::new(|d| fs::write(d.join("conf"), garbage(62, 2)).unwrap()),
        ),
        (
            "conf deleted",
            Box::new(|d| fs::remove_file(d.join("conf")).unwrap()),
        ),
        (
            "blobs deleted",
            Box::new(|d| {
                for b in fs::read_dir(d.join("blobs")).unwrap() {
                    fs::remove_file(b.unwrap().path()).unwrap();
                }
            }),
        ),
        (
            "blobs truncated",
            Box::new(|d| {
                for b in fs::read_dir(d.join("blobs")).unwrap() {
                    File::create(b.unwrap().path()).unwrap();
                }
            }),
        ),
        (
            "blobs overwritten with garbage",
            Box::new(|d| {
                for (i, b) in fs::read_dir(d.join("blobs")).unwrap().enumerate() {
                    let p = b.unwrap().path();
                    let len = fs::metadata(&p).unwrap().len() as usize;
                    fs::write(&p, garbage(len, 10 + i as u32)).unwrap();
                }
            }),
        ),
        (
            "sled snapshot files overwritten with garbage",
            Box::new(|d| {
                let snaps: Vec<PathBuf> = fs::read_dir(d)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| {
                        p.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with("snap.")
                    })
                    .collect();
                assert!(
                    !snaps.is_empty(),
                    "the fixture ledger has no sled snapshot file"
                );
                for (i, p) in snaps.iter().enumerate() {
                    let len = fs::metadata(p).unwrap().len() as usize;
                    fs::write(p, garbage(len.max(64), 20 + i as u32)).unwrap();
                }
            }),
        ),
    ];

    let base_heads = heads(&base);
    // Cases sled survived with every entry intact (a blob it no longer
    // needed, a snapshot file it ignores): no damage, nothing to refuse.
    let mut harmless = Vec::new();
    let mut refused = Vec::new();
    for (case, damage) in &cases {
        let dir = tmp.path().join(case.replace(' ', "-"));
        copy_dir(&base, &dir);
        damage(&dir);
        let out = run(&["verify", "--data", path(&dir)]);
        if out.status.success() {
            assert_eq!(
                heads(&dir),
                base_heads,
                "case {case:?}: verify passed on a ledger that lost entries"
            );
            harmless.push(*case);
            continue;
        }
        refused.push(format!(
            "{case}: {}",
            stderr(&out).lines().last().unwrap_or_default()
        ));
        let export = tmp.path().join(format!("{}.dlx", case.replace(' ', "-")));
        let d = path(&dir);
        let commands: Vec<(&str, Vec<&str>)> = vec![
            ("verify", vec!["verify", "--data", d]),
            ("replay", vec!["replay", "--data", d]),
            (
                "ingest",
                vec![
                    "ingest",
                    "--until-caught-up",
                    "--no-dead-letter",
                    "--topic",
                    topic,
                    "--data",
                    d,
                ],
            ),
            (
                "export",
                vec!["export", "--data", d, "--out", path(&export)],
            ),
        ];
        for (name, args) in &commands {
            assert_refused(case, name, &run(args), &dir);
        }
        assert_refused(case, "serve", &serve_once(topic, &dir), &dir);
        assert!(!export.exists(), "case {case:?}: an export was written");
        // Nothing turned the folder into a fresh (empty) ledger: it is
        // refused at open, or (sled reads lazily: damage to a blob of
        // entries shows only when they are read) it still holds its heads.
        match Store::open_existing(&dir) {
            Err(error) => assert!(
                error.to_string().contains("rebuild --from-kafka"),
                "case {case:?}: {error}"
            ),
            Ok(store) => {
                drop(store);
                assert!(
                    case.starts_with("blobs"),
                    "case {case:?}: the damaged ledger opened"
                );
                assert_eq!(
                    heads(&dir),
                    base_heads,
                    "case {case:?}: not the same ledger"
                );
            }
        }
    }
    eprintln!(
        "refused:\n  {}\nharmless (every entry intact): {harmless:?}",
        refused.join("\n  ")
    );
    for case in harmless {
        assert!(
            case.starts_with("blobs") || case.contains("snapshot"),
            "damage to {case:?} cannot be harmless"
        );
    }
    // The undamaged original still opens and verifies: the cases were the damage.
    assert_verifies(&base);
}

#[test]
fn an_empty_folder_is_no_ledger_for_the_offline_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    for args in [
        vec!["verify", "--data", path(&empty)],
        vec!["replay", "--data", path(&empty)],
        vec!["export", "--data", path(&empty), "--out", "/dev/null"],
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(
            stderr(&out).contains("the folder is empty"),
            "{}",
            describe(&out)
        );
        assert_eq!(
            fs::read_dir(&empty).unwrap().count(),
            0,
            "`{}` wrote into the empty folder",
            args[0]
        );
    }
}

// ---------------------------------------------------------------------------
// 2. SIGKILL during export, import and rebuild
// ---------------------------------------------------------------------------

/// Kills of each command.
const KILL_ROUNDS: usize = 5;

/// Runs `args` once to the end (how long it takes), then [`KILL_ROUNDS`]
/// times killed with SIGKILL at spread fractions of that time, calling
/// `check(round)` after each kill and `prepare(round)` before each run.
/// Returns how many kills landed while the command was still running.
fn kill_repeatedly(
    args: &[&str],
    mut prepare: impl FnMut(),
    mut check: impl FnMut(usize),
) -> (Duration, usize) {
    prepare();
    let started = Instant::now();
    expect_success(&run(args));
    let full = started.elapsed();
    check(usize::MAX);
    let mut mid_run = 0;
    for round in 0..KILL_ROUNDS {
        prepare();
        // 10 %, 28 %, 46 %, 64 %, 82 % of a full run.
        let fraction = 0.1 + 0.18 * round as f64;
        let mut child = bin(bootstrap())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(fraction));
        if child.try_wait().unwrap().is_none() {
            mid_run += 1;
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        check(round);
    }
    (full, mid_run)
}

#[test]
fn sigkill_during_export_import_and_rebuild_leaves_the_old_or_the_complete_new_result() {
    let topic = fixture_topic();
    let tmp = tempfile::tempdir().unwrap();
    let ledger = tmp.path().join("ledger");
    ingest_fixture(&ledger, 2_000);
    let reference_heads = heads(&ledger);

    // Export over an older, complete export of another ledger: the file is
    // always one of the two, whole.
    let small = tmp.path().join("small");
    let scenario_topic = unique_topic("faults-old");
    create_topic(&scenario_topic, 1);
    let scenario = crate::common::repo_file("schemas/examples/scenario.jsonl");
    expect_success(&run(&[
        "produce",
        "--topic",
        &scenario_topic,
        path(&scenario),
    ]));
    expect_success(&run(&[
        "ingest",
        "--until-caught-up",
        "--no-dead-letter",
        "--topic",
        &scenario_topic,
        "--data",
        path(&small),
    ]));
    let file = tmp.path().join("ledger.dlx");
    expect_success(&run(&[
        "export",
        "--data",
        path(&small),
        "--out",
        path(&file),
    ]));
    let old = fs::read(&file).unwrap();
    let mut new: Option<Vec<u8>> = None;
    let (mut old_seen, mut new_seen) = (0, 0);
    let (full, mid_run) = kill_repeatedly(
        &["export", "--data", path(&ledger), "--out", path(&file)],
        || {},
        |round| {
            let now = fs::read(&file).expect("the export file is never removed");
            if round == usize::MAX {
                new = Some(now);
                // Start the kills from the old file again.
                fs::write(&file, &old).unwrap();
                return;
            }
            if now == old {
                old_seen += 1;
            } else {
                assert!(
                    Some(&now) == new.as_ref(),
                    "round {round}: the export file is neither the old nor the complete new export ({} bytes)",
                    now.len()
                );
                new_seen += 1;
            }
            let out = run(&["verify", "--export", path(&file)]);
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        },
    );
    eprintln!(
        "export: full run {full:?}; {mid_run} of {KILL_ROUNDS} kills mid-run; file old {old_seen}, new {new_seen}"
    );
    assert!(
        mid_run >= 2,
        "only {mid_run} kills landed during the export"
    );
    let export = tmp.path().join("complete.dlx");
    expect_success(&run(&[
        "export",
        "--data",
        path(&ledger),
        "--out",
        path(&export),
    ]));

    // Import: DIR is absent or a complete ledger equal to the export's.
    let imported = tmp.path().join("imported");
    let staging = tmp.path().join("imported.importing");
    let mut complete = 0;
    let (full, mid_run) = kill_repeatedly(
        &["import", path(&export), "--data", path(&imported)],
        || {
            if imported.exists() {
                fs::remove_dir_all(&imported).unwrap();
            }
        },
        |round| {
            if imported.exists() {
                assert_eq!(heads(&imported), reference_heads, "round {round}");
                assert_verifies(&imported);
                complete += 1;
            }
        },
    );
    eprintln!(
        "import: full run {full:?}; {mid_run} of {KILL_ROUNDS} kills mid-run; {complete} complete ledgers, leftover staging: {}",
        staging.exists()
    );
    assert!(
        mid_run >= 2,
        "only {mid_run} kills landed during the import"
    );
    // A leftover half-built folder is never a result, and does not block
    // the next import.
    if imported.exists() {
        fs::remove_dir_all(&imported).unwrap();
    }
    expect_success(&run(&["import", path(&export), "--data", path(&imported)]));
    assert!(!staging.exists());
    assert_eq!(heads(&imported), reference_heads);

    // Rebuild from Kafka: the same, with DIR.rebuilding.
    let rebuilt = tmp.path().join("rebuilt");
    let staging = tmp.path().join("rebuilt.rebuilding");
    let mut complete = 0;
    let args = [
        "rebuild",
        "--from-kafka",
        "--topic",
        topic,
        "--data",
        path(&rebuilt),
        "--batch-records",
        "2000",
    ];
    let (full, mid_run) = kill_repeatedly(
        &args,
        || {
            if rebuilt.exists() {
                fs::remove_dir_all(&rebuilt).unwrap();
            }
        },
        |round| {
            if rebuilt.exists() {
                assert_eq!(heads(&rebuilt), reference_heads, "round {round}");
                assert_verifies(&rebuilt);
                complete += 1;
            }
        },
    );
    eprintln!(
        "rebuild: full run {full:?}; {mid_run} of {KILL_ROUNDS} kills mid-run; {complete} complete ledgers, leftover staging: {}",
        staging.exists()
    );
    assert!(
        mid_run >= 2,
        "only {mid_run} kills landed during the rebuild"
    );
    if rebuilt.exists() {
        fs::remove_dir_all(&rebuilt).unwrap();
    }
    let out = run(&[
        "rebuild",
        "--from-kafka",
        "--topic",
        topic,
        "--data",
        path(&rebuilt),
        "--compare-with",
        path(&ledger),
    ]);
    expect_success(&out);
    assert!(!staging.exists());
    assert_eq!(heads(&rebuilt), reference_heads);
}

// ---------------------------------------------------------------------------
// 3 and 4. A broker of our own: absent at start, restarted mid-ingest
// ---------------------------------------------------------------------------

/// A broker of this test alone, on its own port and state folder. Dropping
/// it stops it and deletes its state; the shared broker is never touched.
struct OwnBroker {
    port: u16,
    run_dir: tempfile::TempDir,
}

impl OwnBroker {
    /// Starts a broker on `port` (the controller takes `port` + 1000).
    fn start(port: u16) -> OwnBroker {
        let broker = OwnBroker {
            port,
            run_dir: tempfile::tempdir().unwrap(),
        };
        broker.up();
        broker
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn script(&self, name: &str) -> Command {
        let mut command = Command::new(crate::common::repo_file(&format!("ops/kafka/{name}")));
        command
            .env("KAFKA_PORT", self.port.to_string())
            .env("DEALLEDGER_RUN_DIR", self.run_dir.path())
            .env_remove("KAFKA_BOOTSTRAP")
            .env_remove("KAFKA_CONTROLLER_PORT")
            .env_remove("KAFKA_SECURITY");
        command
    }

    fn up(&self) {
        let out = self.script("up").output().expect("run ops/kafka/up");
        assert!(
            out.status.success(),
            "ops/kafka/up on port {} failed:\n{}",
            self.port,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains(&format!("KAFKA_BOOTSTRAP={}", self.bootstrap())),
            "ops/kafka/up started no broker of our own: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    fn down(&self) {
        let out = self.script("down").output().expect("run ops/kafka/down");
        assert!(
            out.status.success(),
            "ops/kafka/down on port {} failed:\n{}",
            self.port,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap();
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1");
        let results =
            futures::executor::block_on(admin.create_topics(&[new], &AdminOptions::new()))
                .expect("create_topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.high_watermarks(topic).len() != partitions as usize {
            assert!(Instant::now() < deadline, "topic {topic} not ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The high watermark of every partition of `topic` (empty if unknown).
    fn high_watermarks(&self, topic: &str) -> Vec<(i32, i64)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "dealledger-faults-unused")
            .create()
            .unwrap();
        let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
            return Vec::new();
        };
        let Some(t) = md.topics().first() else {
            return Vec::new();
        };
        if t.error().is_some() {
            return Vec::new();
        }
        t.partitions()
            .iter()
            .filter_map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .ok()?;
                Some((p.id(), high))
            })
            .collect()
    }

    /// Produces `events` with `dealledger produce`, retrying the whole
    /// chunk until it succeeds (a retried chunk may land twice: the
    /// ledger records the second copies as duplicates).
    fn produce(&self, topic: &str, events: &[u8]) -> usize {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let out = run_on(
                &self.bootstrap(),
                &["produce", "--topic", topic, "-"],
                Some(events),
            );
            if out.status.success() {
                return attempts;
            }
            assert!(attempts < 20, "produce kept failing: {}", describe(&out));
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let mut down = self.script("down");
        down.arg("--wipe");
        let _ = down.output();
    }
}

/// Lines of `log` that mention a retry of the Kafka connection.
fn retry_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Kafka unreachable; retrying in"))
        .map(str::to_owned)
        .collect()
}

/// The pause a retry line announces ("retrying in 500ms", "... in 2s").
fn retry_pause(line: &str) -> Duration {
    let text = line
        .split("retrying in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no pause in {line:?}"));
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    let text = text.split('\u{1b}').next().unwrap_or(&text);
    if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_secs_f64(ms.parse::<f64>().unwrap() / 1000.0)
    } else if let Some(s) = text.strip_suffix('s') {
        Duration::from_secs_f64(s.parse().unwrap())
    } else {
        panic!("cannot read the pause {text:?} in {line:?}")
    }
}

#[test]
fn a_broker_absent_at_start_is_waited_for_with_backoff_then_ingested() {
    let broker = OwnBroker::start(19192);
    let topic = unique_topic("faults-absent");
    broker.create_topic(&topic, 2);
    let events = generated(2_000, 21);
    broker.produce(&topic, &events);
    let watermarks = broker.high_watermarks(&topic);
    assert_eq!(watermarks.iter().map(|(_, h)| h).sum::<i64>(), 2_000);
    broker.down();

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let mut daemon = Daemon::start(
        &broker.bootstrap(),
        &topic,
        &data,
        tmp.path().join("serve.log"),
    );
    let degraded = daemon.wait_health(
        "degraded, kafka unreachable",
        Duration::from_secs(60),
        |h| status_of(h) == "degraded" && reasons_of(h).contains("kafka unreachable"),
    );
    eprintln!("while the broker is absent: {degraded}");
    // It keeps retrying, with growing pauses, and stays up.
    let deadline = Instant::now() + Duration::from_secs(90);
    while retry_lines(&daemon.log()).len() < 3 {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "fewer than 3 retries logged in 90 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let retries = retry_lines(&daemon.log());
    eprintln!("retries so far:\n{}", retries.join("\n"));
    // Each retry logged once, with a growing pause, bounded.
    let pauses: Vec<Duration> = retries.iter().map(|l| retry_pause(l)).collect();
    assert!(
        pauses
            .windows(2)
            .all(|w| w[0] < w[1] || w[1] == Duration::from_secs(10)),
        "the backoff does not grow: {pauses:?}"
    );
    assert!(
        pauses.iter().all(|p| *p <= Duration::from_secs(10)),
        "{pauses:?}"
    );
    assert_eq!(
        status_of(&health(daemon.port).unwrap()),
        "degraded",
        "still degraded"
    );

    broker.up();
    let deadline = Instant::now() + Duration::from_secs(120);
    while events_ingested(daemon.port) < 2_000 {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "the daemon did not ingest after the broker appeared:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.wait_health("ok", Duration::from_secs(30), |h| status_of(h) == "ok");
    daemon.stop();
    assert_exactly_once(&data, &watermarks);
}

#[test]
fn a_broker_restart_during_sustained_ingest_loses_and_doubles_nothing() {
    let broker = OwnBroker::start(19292);
    let topic = unique_topic("faults-restart");
    broker.create_topic(&topic, 3);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    let mut daemon = Daemon::start(
        &broker.bootstrap(),
        &topic,
        &data,
        tmp.path().join("serve.log"),
    );

    // Sustained produce in the background: 30 chunks of 500 events.
    let events = String::from_utf8(generated(15_000, 31)).unwrap();
    let chunks: Vec<String> = events
        .lines()
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|c| c.join("\n"))
        .collect();
    let producing = std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            let mut retried = 0;
            for chunk in &chunks {
                retried += broker.produce(&topic, chunk.as_bytes()) - 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            retried
        });

        // Restart the broker once the daemon has ingested part of the stream.
        let deadline = Instant::now() + Duration::from_secs(120);
        while events_ingested(daemon.port) < 2_000 {
            daemon.assert_running();
            assert!(Instant::now() < deadline, "no ingest:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = events_ingested(daemon.port);
        broker.down();
        let degraded = daemon.wait_health(
            "degraded while the broker is down",
            Duration::from_secs(60),
            |h| status_of(h) == "degraded" && reasons_of(h).contains("kafka unreachable"),
        );
        eprintln!("{before} events ingested, then the broker stopped: {degraded}");
        std::thread::sleep(Duration::from_secs(3));
        daemon.assert_running();
        broker.up();
        daemon.wait_health("ok after the restart", Duration::from_secs(120), |h| {
            status_of(h) == "ok"
        });
        let retried = producer.join().unwrap();
        (before, retried)
    });
    eprintln!("chunks the producer had to send again: {}", producing.1);

    // Caught up with everything the topic holds (duplicates included).
    let watermarks = broker.high_watermarks(&topic);
    let total: i64 = watermarks.iter().map(|(_, h)| h).sum();
    assert!(total >= 15_000, "{watermarks:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while (events_ingested(daemon.port) as i64) < total {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "ingested {} of {total}:\n{}",
            events_ingested(daemon.port),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        events_ingested(daemon.port) > producing.0,
        "nothing ingested after the restart"
    );
    daemon.stop();
    assert_exactly_once(&data, &watermarks);
}

// ---------------------------------------------------------------------------
// 5. A full disk
// ---------------------------------------------------------------------------

/// A tmpfs mounted for one test; unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path(dir),
            ])
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs on {} (this test needs root to mount one): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}"), path(&self.dir)])
            .output()
            .expect("run mount");
        assert!(out.status.success(), "{}", describe(&out));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
        if fs::read_dir(&self.dir).is_ok_and(|mut d| d.next().is_some()) {
            // Still mounted (busy): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        }
    }
}

#[test]
fn a_full_disk_stops_ingest_with_a_clear_error_and_a_restart_resumes() {
    let topic = fixture_topic();
    let tmp = tempfile::tempdir().unwrap();
    // The reference: the whole topic ingested on a roomy disk.
    let reference = tmp.path().join("reference");
    ingest_fixture(&reference, 1_000);
    let expected = heads(&reference);

    let mnt = Tmpfs::mount(&tmp.path().join("small"), "16m");
    let data = mnt.dir.join("ledger");
    let ingest = || {
        run(&[
            "ingest",
            "--until-caught-up",
            "--no-dead-letter",
            "--topic",
            topic,
            "--data",
            path(&data),
            "--batch-records",
            "1000",
        ])
    };
    let out = ingest();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(!err.contains("panicked"), "{}", describe(&out));
    assert!(err.contains(path(&data)), "{}", describe(&out));
    assert!(err.contains("the disk is full"), "{}", describe(&out));
    assert!(
        err.contains("free at least") && err.contains(" MiB on the filesystem holding"),
        "{}",
        describe(&out)
    );
    eprintln!(
        "disk full: {}",
        err.lines().find(|l| l.contains("disk is full")).unwrap()
    );

    // Offline commands still work, or say the disk is full, naming the
    // folder: sled writes at open, and whether it has room depends on which
    // write met the full disk (the scratch files are removed when ingest
    // stops, freeing what they held).
    let out = run(&["verify", "--data", path(&data)]);
    assert!(
        out.status.success()
            || (stderr(&out).contains("the disk is full") && stderr(&out).contains(path(&data))),
        "{}",
        describe(&out)
    );

    // Room again: no partial batch is visible, and a restart resumes.
    mnt.resize("128m");
    let partial: Vec<(i32, u64, String)> = heads(&data);
    let stored: u64 = partial.iter().map(|h| h.1).sum();
    assert!(
        stored > 0 && stored < FIXTURE_EVENTS,
        "the disk filled after {stored} entries"
    );
    assert_exactly_once(
        &data,
        &partial
            .iter()
            .map(|(p, n, _)| (*p, *n as i64))
            .collect::<Vec<_>>(),
    );
    expect_success(&ingest());
    assert_eq!(heads(&data), expected);
    let watermarks: Vec<(i32, i64)> = expected.iter().map(|(p, n, _)| (*p, *n as i64)).collect();
    assert_exactly_once(&data, &watermarks);
}
