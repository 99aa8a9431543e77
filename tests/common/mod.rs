//! What the integration tests share: a real Kafka broker, unique topics, and
//! helpers to run the `dealledger` binary and read topics back.
//!
//! The broker is started once per test run with `ops/kafka/up` (idempotent:
//! an already running broker is reused), or taken from `KAFKA_BOOTSTRAP` when
//! that is set. Each test creates its own topic, so tests run in parallel
//! without seeing each other's events.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under the repository root.
pub fn repo_file(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// The bootstrap servers of the test broker, starting it on first use.
pub fn bootstrap() -> &'static str {
    static BOOTSTRAP: OnceLock<String> = OnceLock::new();
    BOOTSTRAP.get_or_init(|| {
        if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP")
            && !b.is_empty()
        {
            return b;
        }
        let out = Command::new(repo_file("ops/kafka/up"))
            .output()
            .expect("run ops/kafka/up");
        assert!(
            out.status.success(),
            "ops/kafka/up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("KAFKA_BOOTSTRAP="))
            .unwrap_or_else(|| panic!("ops/kafka/up printed no KAFKA_BOOTSTRAP line: {stdout}"))
            .trim()
            .to_string()
    })
}

/// A topic name no other test (or earlier run) uses.
pub fn unique_topic(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test-{name}-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates `topic` with `partitions` partitions and infinite retention.
pub fn create_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = rt
        .block_on(admin.create_topics(&[new], &AdminOptions::new()))
        .expect("create_topics request");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
    // Wait until the topic's metadata shows every partition with a leader.
    let consumer = plain_consumer();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
            && let Some(t) = md.topics().first()
            && t.error().is_none()
            && t.partitions().len() == partitions as usize
            && t.partitions().iter().all(|p| p.leader() >= 0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} not ready after 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A consumer with no group: tests assign partitions explicitly.
pub fn plain_consumer() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", "dealledger-tests-unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer")
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl ReadRecord {
    fn from_message(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        ReadRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .map(|k| std::str::from_utf8(k).expect("utf-8 key"))
    }
}

/// The high watermark of every partition of `topic`.
pub fn high_watermarks(topic: &str) -> Vec<(i32, i64)> {
    let consumer = plain_consumer();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            (p.id(), high)
        })
        .collect()
}

/// Reads every record of `topic` from the beginning up to the current high
/// watermarks, in partition then offset order.
pub fn read_all(topic: &str) -> Vec<ReadRecord> {
    let marks = high_watermarks(topic);
    let want: i64 = marks.iter().map(|(_, h)| h).sum();
    let consumer = plain_consumer();
    let mut tpl = TopicPartitionList::new();
    for (p, _) in &marks {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < want {
        assert!(
            Instant::now() < deadline,
            "read {} of {want} records of {topic} in 60 s",
            out.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            out.push(ReadRecord::from_message(&m.expect("consume")));
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// Runs the `dealledger` binary with `args` (and optional stdin), returning its output.
pub fn dealledger(args: &[&str], stdin: Option<&[u8]>) -> Output {
    dealledger_in(&repo_root(), args, stdin)
}

/// Runs the `dealledger` binary in `dir`.
pub fn dealledger_in(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args(args)
        .current_dir(dir)
        .env("DEALLEDGER_BROKERS", bootstrap())
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
    child.wait_with_output().expect("wait for dealledger")
}

/// Stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Edits the raw sled tree of a ledger (as an attacker with file access
/// would), then waits until sled has released the folder.
pub fn edit_raw(data: &Path, edit: impl FnOnce(&sled::Tree)) {
    {
        let db = sled::open(data).unwrap();
        let tree = db.open_tree("ledger").unwrap();
        edit(&tree);
        db.flush().unwrap();
    }
    let file = std::fs::File::open(data.join("db")).unwrap();
    let started = Instant::now();
    while file.try_lock().is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "sled keeps its lock"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    file.unlock().unwrap();
}

/// Rewrites the entry page holding entry `seq` of `partition` (storage
/// format 2, docs/FORMAT.md "Entry pages": key `E` ‖ u32 partition ‖ u64
/// first seq; value u8 1 ‖ u32 count ‖ (u32 length ‖ entry)*) after `edit`
/// changed its entries (given with the index of `seq`); a page left empty is
/// deleted.
pub fn edit_page(
    tree: &sled::Tree,
    partition: i32,
    seq: u64,
    edit: impl FnOnce(&mut Vec<Vec<u8>>, usize),
) {
    let mut prefix = vec![b'E'];
    prefix.extend_from_slice(&(partition as u32).to_be_bytes());
    let mut last = prefix.clone();
    last.extend_from_slice(&seq.to_be_bytes());
    let (key, page) = tree
        .range(prefix..=last)
        .next_back()
        .expect("a page holds the entry")
        .unwrap();
    let first_seq = u64::from_be_bytes(key[5..].try_into().unwrap());
    assert_eq!(page[0], 1, "page format");
    let count = u32::from_be_bytes(page[1..5].try_into().unwrap());
    let mut entries = Vec::new();
    let mut at = 5;
    for _ in 0..count {
        let len = u32::from_be_bytes(page[at..at + 4].try_into().unwrap()) as usize;
        entries.push(page[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    assert_eq!(at, page.len());
    let index = (seq - first_seq) as usize;
    assert!(index < entries.len(), "the page holds the entry");
    edit(&mut entries, index);
    if entries.is_empty() {
        tree.remove(key).unwrap();
        return;
    }
    let mut value = vec![1];
    value.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for entry in &entries {
        value.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        value.extend_from_slice(entry);
    }
    tree.insert(key, value).unwrap();
}
