//! Kafka over TLS with SASL/SCRAM, end to end: a broker with a SASL_SSL
//! listener (`KAFKA_SECURITY=sasl_ssl ops/kafka/up`: a throwaway CA and a
//! broker certificate made with openssl, a SCRAM-SHA-512 user made at
//! format time) on its own port and state dir; the example scenario produced
//! and ingested through it with the secrets in a config file and in the
//! environment; a wrong password and an untrusted CA refused quickly with a
//! clear message; a secret on the command line refused; and the password
//! never in any output. Only this test's broker is stopped at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::common::{describe, repo_file};

/// Client port of this test's broker (controller +1000, internal +2000);
/// other tests' own brokers use 19192 and 19292.
const PORT: u16 = 19394;
/// Partitions of the test topic.
const PARTITIONS: i32 = 3;

/// This test's SASL_SSL broker, stopped (and only it) when dropped.
struct SecureBroker {
    run_dir: tempfile::TempDir,
    /// What `ops/kafka/up` printed: KAFKA_BOOTSTRAP, KAFKA_SSL_CA_LOCATION, ...
    env: HashMap<String, String>,
}

impl SecureBroker {
    fn ops(&self, script: &str) -> Command {
        let mut c = Command::new(repo_file(script));
        c.env("KAFKA_SECURITY", "sasl_ssl")
            .env("KAFKA_PORT", PORT.to_string())
            .env("DEALLEDGER_RUN_DIR", self.run_dir.path())
            .env_remove("KAFKA_BOOTSTRAP")
            .env_remove("KAFKA_CONTROLLER_PORT")
            .env_remove("KAFKA_INTERNAL_PORT")
            .env_remove("KAFKA_SCRAM_USER")
            .env_remove("KAFKA_SCRAM_PASSWORD");
        c
    }

    fn start() -> SecureBroker {
        let mut broker = SecureBroker {
            run_dir: tempfile::tempdir().unwrap(),
            env: HashMap::new(),
        };
        let out = broker
            .ops("ops/kafka/up")
            .output()
            .expect("run ops/kafka/up");
        assert!(
            out.status.success(),
            "secure ops/kafka/up: {}",
            describe(&out)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        for line in stdout.lines() {
            let (k, v) = line.split_once('=').expect("KEY=value lines");
            broker.env.insert(k.to_string(), v.to_string());
        }
        broker
    }

    fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("ops/kafka/up printed no {key}: {:?}", self.env))
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        // KAFKA_PORT and KAFKA_SECURITY are set: this stops our broker only.
        let _ = self.ops("ops/kafka/down").output();
    }
}

/// Reads a librdkafka properties file into pairs.
fn properties(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// Runs `dealledger` with only the given DEALLEDGER_* environment.
fn dealledger(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dealledger"));
    c.args(args).current_dir(repo_file(""));
    for (k, _) in std::env::vars() {
        if k.starts_with("DEALLEDGER_") || k.starts_with("KAFKA_") {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run dealledger")
}

fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn create_topic(client: &[(String, String)], bootstrap: &str, topic: &str) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in client {
        config.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let new =
        NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1)).set("retention.ms", "-1");
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    for r in rt
        .block_on(admin.create_topics(&[new], &opts))
        .expect("create_topics over SASL_SSL")
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t} over SASL_SSL: {e}"));
    }
}

#[test]
fn sasl_ssl_produce_ingest_and_clear_refusals() {
    let broker = SecureBroker::start();
    let bootstrap = broker.get("KAFKA_BOOTSTRAP").to_string();
    assert_eq!(bootstrap, format!("127.0.0.1:{PORT}"));
    assert_eq!(broker.get("KAFKA_SECURITY_PROTOCOL"), "SASL_SSL");
    assert_eq!(broker.get("KAFKA_SASL_MECHANISM"), "SCRAM-SHA-512");
    let ca = PathBuf::from(broker.get("KAFKA_SSL_CA_LOCATION"));
    let client_file = PathBuf::from(broker.get("DEALLEDGER_KAFKA_CONFIG"));
    assert!(ca.is_file() && client_file.is_file(), "{:?}", broker.env);
    let client = properties(&client_file);
    let password = client
        .iter()
        .find(|(k, _)| k == "sasl.password")
        .map(|(_, v)| v.clone())
        .expect("client.properties holds sasl.password");
    assert!(password.len() >= 16, "a generated password");
    assert!(
        !broker.env.values().any(|v| v.contains(&password)),
        "ops/kafka/up printed the password"
    );

    let topic = format!("secure-{}", std::process::id());
    create_topic(&client, &bootstrap, &topic);
    let scenario = repo_file("schemas/examples/scenario.jsonl");
    let events = std::fs::read_to_string(&scenario)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    let mut outputs = Vec::new();

    // Produce through SASL_SSL, all settings from the file (--kafka-config),
    // with debug logging on: the settings are logged, the password is not.
    let out = dealledger(
        &[
            "produce",
            "--json",
            "--brokers",
            &bootstrap,
            "--topic",
            &topic,
            "--kafka-config",
            client_file.to_str().unwrap(),
            scenario.to_str().unwrap(),
        ],
        &[("DEALLEDGER_LOG", "debug")],
    );
    assert!(
        out.status.success(),
        "produce over SASL_SSL: {}",
        describe(&out)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sent"], events, "{summary}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sasl.password"),
        "debug log lists the settings: {}",
        describe(&out)
    );
    outputs.push(out);

    // Ingest through SASL_SSL: the file (named by DEALLEDGER_KAFKA_CONFIG)
    // without the password, the password from the environment.
    let tmp = tempfile::tempdir().unwrap();
    let no_password = tmp.path().join("client.properties");
    let text: String = client
        .iter()
        .filter(|(k, _)| k != "sasl.password")
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    std::fs::write(&no_password, text).unwrap();
    let data = tmp.path().join("ledger");
    let ingest = |data: &Path, extra: &[(&str, &str)]| {
        let mut env = vec![("DEALLEDGER_KAFKA_CONFIG", no_password.to_str().unwrap())];
        env.extend_from_slice(extra);
        dealledger(
            &[
                "ingest",
                "--until-caught-up",
                "--json",
                "--brokers",
                &bootstrap,
                "--topic",
                &topic,
                "--group",
                &format!("{topic}-ledger"),
                "--data",
                data.to_str().unwrap(),
            ],
            &env,
        )
    };
    let out = ingest(
        &data,
        &[
            ("DEALLEDGER_KAFKA__SASL_PASSWORD", &password),
            ("DEALLEDGER_LOG", "debug"),
        ],
    );
    assert!(
        out.status.success(),
        "ingest over SASL_SSL: {}",
        describe(&out)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["ingested"], events, "{summary}");
    assert_eq!(summary["accepted"], events, "{summary}");
    outputs.push(out);
    let out = dealledger(&["verify", "--data", data.to_str().unwrap()], &[]);
    assert!(out.status.success(), "verify: {}", describe(&out));
    outputs.push(out);

    // A wrong password: both commands fail quickly, naming the broker and what to check.
    let wrong = [("DEALLEDGER_KAFKA__SASL_PASSWORD", "not-the-password")];
    let out = ingest(&tmp.path().join("wrong-pw"), &wrong);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text.contains(&format!("authentication failed at broker {bootstrap}")),
        "{text}"
    );
    assert!(text.contains("sasl.password"), "{text}");
    outputs.push(out);
    let out = dealledger(
        &[
            "produce",
            "--brokers",
            &bootstrap,
            "--topic",
            &topic,
            scenario.to_str().unwrap(),
        ],
        &[
            ("DEALLEDGER_KAFKA_CONFIG", no_password.to_str().unwrap()),
            wrong[0],
        ],
    );
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text.contains(&format!("authentication failed at broker {bootstrap}")),
        "{text}"
    );
    outputs.push(out);

    // A CA that did not sign the broker's certificate (made here with openssl).
    let other_ca = tmp.path().join("other-ca.pem");
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=not the broker's CA", "-keyout"])
        .arg(tmp.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "openssl: {}", describe(&made));
    let untrusted = [
        ("DEALLEDGER_KAFKA__SASL_PASSWORD", password.as_str()),
        (
            "DEALLEDGER_KAFKA__SSL_CA_LOCATION",
            other_ca.to_str().unwrap(),
        ),
    ];
    let out = ingest(&tmp.path().join("untrusted"), &untrusted);
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text.contains(&format!(
            "the TLS certificate of Kafka broker {bootstrap} is not trusted"
        )),
        "{text}"
    );
    assert!(text.contains("ssl.ca.location"), "{text}");
    outputs.push(out);
    let mut env = vec![("DEALLEDGER_KAFKA_CONFIG", no_password.to_str().unwrap())];
    env.extend_from_slice(&untrusted);
    let out = dealledger(
        &[
            "produce",
            "--brokers",
            &bootstrap,
            "--topic",
            &topic,
            scenario.to_str().unwrap(),
        ],
        &env,
    );
    let text = all_output(&out);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(text.contains("is not trusted"), "{text}");
    outputs.push(out);

    // A secret on the command line is refused, without echoing it.
    let secret_arg = format!("sasl.password={password}");
    let out = dealledger(
        &[
            "ingest",
            "--until-caught-up",
            "--brokers",
            &bootstrap,
            "--topic",
            &topic,
            "--data",
            tmp.path().join("cli-secret").to_str().unwrap(),
            "-X",
            &secret_arg,
        ],
        &[("DEALLEDGER_KAFKA_CONFIG", no_password.to_str().unwrap())],
    );
    let text = all_output(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("secrets are not accepted on the command line")
            && text.contains("DEALLEDGER_KAFKA__SASL_PASSWORD"),
        "{text}"
    );
    outputs.push(out);

    // The password appears in no output of any run above.
    for out in &outputs {
        assert!(
            !all_output(out).contains(&password),
            "the password leaked: {}",
            describe(out)
        );
    }
}
