//! Kafka client settings shared by the producer and the ingester.
//!
//! Every Kafka client dealledger creates is configured here, from four
//! layers applied in order:
//!
//! 1. dealledger's own defaults for the role (producer, consumer, admin);
//! 2. a librdkafka properties file (`--kafka-config FILE`, or the
//!    environment variable `DEALLEDGER_KAFKA_CONFIG`): one `key=value` per
//!    line, `#` and `!` comments; the place for TLS and SASL settings;
//! 3. the environment: `DEALLEDGER_KAFKA__<KEY>=value` sets the librdkafka
//!    setting `<key>`, where KEY is the setting upper-cased with every `.`
//!    written as `_` (librdkafka's string settings contain no `_`), e.g.
//!    `DEALLEDGER_KAFKA__SASL_PASSWORD` sets `sasl.password` and
//!    `DEALLEDGER_KAFKA__SECURITY_PROTOCOL` sets `security.protocol`;
//! 4. explicit `-X key=value` overrides from the command line.
//!
//! Secrets (see [`is_secret`]: passwords, client secrets, private keys) are
//! accepted from the file and the environment only: a secret in a `-X`
//! override is refused with [`SettingsError::SecretOnCommandLine`], because
//! command lines show in `ps`, shell history and process listings. Secret
//! values are never logged and never part of an error message; a syntax
//! error in the properties file names the line, not its content.
//!
//! [`SecurityFailure`] recognises the client errors that retrying cannot
//! fix (the broker refused the credentials, or the broker's certificate is
//! not trusted), so the producer and the ingester stop with a clear message
//! instead of retrying forever.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Default bootstrap servers when neither `--brokers` nor `DEALLEDGER_BROKERS` is given.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// Default topic of deal events.
pub const DEFAULT_TOPIC: &str = "deal-events";
/// Environment variable naming the properties file (same as `--kafka-config`).
pub const CONFIG_FILE_ENV: &str = "DEALLEDGER_KAFKA_CONFIG";
/// Prefix of environment variables holding single librdkafka settings:
/// `DEALLEDGER_KAFKA__SASL_PASSWORD` sets `sasl.password`.
pub const ENV_PREFIX: &str = "DEALLEDGER_KAFKA__";
/// Largest properties file read (bytes): a client config is a few hundred bytes.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;
/// Longest librdkafka key accepted from the environment or a file (bytes).
pub const MAX_KEY_BYTES: usize = 128;
/// What is shown in logs instead of a secret value.
pub const REDACTED: &str = "<redacted>";

/// Where and how to reach Kafka.
#[derive(Clone, Debug, Default)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// A librdkafka properties file, if any.
    pub config_file: Option<PathBuf>,
    /// `key=value` overrides (the command line's `-X`), applied last. Secret
    /// keys are refused here.
    pub overrides: Vec<(String, String)>,
}

/// Why Kafka settings could not be assembled. No variant ever holds a
/// setting's value.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The properties file could not be read.
    #[error("cannot read Kafka config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The properties file is larger than [`MAX_CONFIG_FILE_BYTES`].
    #[error(
        "Kafka config file {path} is larger than {limit} bytes; it should hold a few key=value lines"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A line of the properties file is not `key=value`.
    #[error(
        "Kafka config file {path}, line {line}: expected key=value (the line is not shown: it may hold a secret)"
    )]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A `-X` override is not `key=value`.
    #[error("-X {0:?}: expected key=value (a librdkafka setting)")]
    Override(String),
    /// A secret was given as a `-X` override.
    #[error(
        "-X {key}=...: secrets are not accepted on the command line (it shows in ps and shell history); \
         put `{key}=...` in the --kafka-config file (or the file named by {CONFIG_FILE_ENV}), \
         or set the environment variable {env}"
    )]
    SecretOnCommandLine {
        /// The librdkafka key.
        key: String,
        /// The environment variable that would set it.
        env: String,
    },
    /// A `DEALLEDGER_KAFKA__*` variable has no key, a too long key or a value
    /// that is not UTF-8.
    #[error(
        "environment variable {var}: {problem} (expected {ENV_PREFIX}<KEY>=value, e.g. {ENV_PREFIX}SASL_PASSWORD)"
    )]
    Environment {
        /// The variable's name (lossy if not UTF-8).
        var: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl KafkaSettings {
    /// Settings for `brokers`, with no file and no overrides.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            ..Default::default()
        }
    }

    /// Parses a `-X key=value` argument into an override. A secret key is
    /// not refused here but when the config is built
    /// ([`SettingsError::SecretOnCommandLine`]): an argument-parser error
    /// would echo the whole argument, secret included.
    pub fn parse_override(arg: &str) -> Result<(String, String), SettingsError> {
        match arg.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(SettingsError::Override(arg.to_string())),
        }
    }

    /// Builds a librdkafka config: `defaults`, then the file, then the
    /// process environment (`DEALLEDGER_KAFKA__*`), then overrides.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig, SettingsError> {
        self.client_config_with_env(defaults, std::env::vars_os())
    }

    /// [`Self::client_config`] with the environment given explicitly.
    pub fn client_config_with_env(
        &self,
        defaults: &[(&str, &str)],
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<ClientConfig, SettingsError> {
        // Refuse secrets on the command line before reading anything else.
        if let Some((key, _)) = self.overrides.iter().find(|(k, _)| is_secret(k)) {
            return Err(SettingsError::SecretOnCommandLine {
                key: key.clone(),
                env: env_var_for(key),
            });
        }
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        if let Some(path) = &self.config_file {
            for (k, v) in read_properties(path)? {
                config.set(k, v);
            }
        }
        for (k, v) in settings_from_env(env)? {
            config.set(k, v);
        }
        for (k, v) in &self.overrides {
            config.set(k, v);
        }
        let mut shown: Vec<(&str, &str)> = config
            .config_map()
            .iter()
            .map(|(k, v)| (*k, shown_value(k, v)))
            .collect();
        shown.sort();
        for (k, v) in shown {
            tracing::debug!(key = %k, value = %v, "kafka setting");
        }
        Ok(config)
    }
}

/// True for librdkafka keys whose values are secrets: never logged, never
/// accepted on the command line.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("passphrase")
        || k.ends_with(".key.pem")
        || k.contains("sasl.oauthbearer.config")
}

/// A setting's value as it may be logged: [`REDACTED`] for secrets.
pub fn shown_value<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret(key) { REDACTED } else { value }
}

/// The environment variable that sets librdkafka `key`
/// (`sasl.password` → `DEALLEDGER_KAFKA__SASL_PASSWORD`).
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "_"))
}

/// The librdkafka settings held by `DEALLEDGER_KAFKA__*` variables of `env`,
/// sorted by key.
fn settings_from_env(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Vec<(String, String)>, SettingsError> {
    let mut out = Vec::new();
    for (name, value) in env {
        let name_lossy = name.to_string_lossy();
        let Some(rest) = name_lossy.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let problem = if rest.is_empty() {
            Some("no setting after the prefix")
        } else if rest.len() > MAX_KEY_BYTES {
            Some("the setting name is too long")
        } else if !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Some("the setting name may only hold letters, digits and _")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(SettingsError::Environment {
                var: name_lossy.into_owned(),
                problem,
            });
        }
        let Some(value) = value.to_str() else {
            return Err(SettingsError::Environment {
                var: name_lossy.into_owned(),
                problem: "the value is not UTF-8",
            });
        };
        out.push((
            rest.to_ascii_lowercase().replace('_', "."),
            value.to_string(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Reads a Java-style properties file: `key=value` lines, `#` and `!` comments.
fn read_properties(path: &Path) -> Result<Vec<(String, String)>, SettingsError> {
    let read_err = |source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(SettingsError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_CONFIG_FILE_BYTES,
        });
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && k.trim().len() <= MAX_KEY_BYTES => {
                out.push((k.trim().to_string(), v.trim().to_string()))
            }
            _ => {
                return Err(SettingsError::Syntax {
                    path: path.to_path_buf(),
                    line: i + 1,
                });
            }
        }
    }
    Ok(out)
}

/// A Kafka client failure that retrying cannot fix: the broker refused the
/// credentials, or the client refused the broker's TLS certificate.
/// librdkafka retries both forever; dealledger stops with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecurityFailure {
    /// SASL authentication failed.
    #[error(
        "Kafka authentication failed at broker {broker}: {reason}. Check sasl.mechanism, \
         sasl.username and sasl.password (set them in the --kafka-config file or with \
         {ENV_PREFIX}SASL_USERNAME / {ENV_PREFIX}SASL_PASSWORD) and that the user exists \
         on the cluster for that mechanism"
    )]
    Authentication {
        /// The broker, as librdkafka names it (`host:port`).
        broker: String,
        /// librdkafka's description.
        reason: String,
    },
    /// The broker's certificate could not be verified.
    #[error(
        "the TLS certificate of Kafka broker {broker} is not trusted: {reason}. Check \
         ssl.ca.location (the CA file that signed the broker's certificate) and that the \
         broker address is a name in its certificate"
    )]
    UntrustedCertificate {
        /// The broker, as librdkafka names it (`host:port`).
        broker: String,
        /// librdkafka's description.
        reason: String,
    },
}

/// librdkafka's phrases for a certificate the client does not trust.
const UNTRUSTED_CERTIFICATE_PHRASES: &[&str] = &[
    "certificate verify failed",
    "could not be verified",
    "self-signed certificate",
    "unable to get local issuer certificate",
];

impl SecurityFailure {
    /// Recognises an authentication or certificate failure among the errors
    /// librdkafka reports to `ClientContext::error`; `None` for everything
    /// else (those are retried as usual).
    pub fn classify(error: &KafkaError, reason: &str) -> Option<Self> {
        let (broker, detail) = split_broker(reason);
        match error.rdkafka_error_code()? {
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
                Some(SecurityFailure::Authentication {
                    broker,
                    reason: detail,
                })
            }
            RDKafkaErrorCode::SSL | RDKafkaErrorCode::BrokerTransportFailure
                if UNTRUSTED_CERTIFICATE_PHRASES
                    .iter()
                    .any(|p| reason.to_ascii_lowercase().contains(p)) =>
            {
                Some(SecurityFailure::UntrustedCertificate {
                    broker,
                    reason: detail,
                })
            }
            _ => None,
        }
    }

    /// Recognises the same failures in a librdkafka log line (facility
    /// `FAIL`, message `[thrd:...]: proto://host:port/id: text`). A consumer
    /// polled through its own queue gets such errors without their text, but
    /// the log line that precedes them has it.
    pub fn from_log(facility: &str, message: &str) -> Option<Self> {
        if facility != "FAIL" {
            return None;
        }
        let text = message
            .strip_prefix("[thrd:")
            .and_then(|m| m.split_once("]: "))
            .map_or(message, |(_, rest)| rest);
        let lower = text.to_ascii_lowercase();
        let (broker, reason) = split_broker(text);
        if lower.contains("sasl authentication error") || lower.contains("authentication failed") {
            Some(SecurityFailure::Authentication { broker, reason })
        } else if UNTRUSTED_CERTIFICATE_PHRASES
            .iter()
            .any(|p| lower.contains(p))
        {
            Some(SecurityFailure::UntrustedCertificate { broker, reason })
        } else {
            None
        }
    }
}

/// Splits librdkafka's `proto://host:port/id: text` into `host:port` and the text.
fn split_broker(reason: &str) -> (String, String) {
    let reason = reason.trim();
    if let Some((head, text)) = reason.split_once(": ")
        && let Some((_, addr)) = head.split_once("://")
        && !addr.contains(' ')
    {
        let host_port = addr.split('/').next().unwrap_or(addr);
        return (host_port.to_string(), text.trim().to_string());
    }
    ("(unknown)".to_string(), reason.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dealledger-kafka-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = temp_dir("layers");
        let file = dir.join("client.properties");
        std::fs::write(
            &file,
            "# comment\nlinger.ms = 7\nsasl.password=hunter2\nacks=1\n",
        )
        .unwrap();
        let mut s = KafkaSettings::new("h:1");
        s.config_file = Some(file);
        s.overrides
            .push(KafkaSettings::parse_override("linger.ms=9").unwrap());
        let c = s
            .client_config_with_env(
                &[("linger.ms", "5"), ("acks", "all"), ("client.id", "d")],
                env(&[
                    ("DEALLEDGER_KAFKA__ACKS", "-1"),
                    ("DEALLEDGER_KAFKA__LINGER_MS", "8"),
                    ("UNRELATED", "x"),
                ]),
            )
            .unwrap();
        assert_eq!(c.get("linger.ms"), Some("9"), "-X beats env and file");
        assert_eq!(c.get("acks"), Some("-1"), "env beats file and defaults");
        assert_eq!(c.get("client.id"), Some("d"), "defaults stay");
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert_eq!(c.get("unrelated"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn environment_maps_to_librdkafka_keys() {
        let got = settings_from_env(env(&[
            ("DEALLEDGER_KAFKA__SASL_PASSWORD", "s3cret"),
            ("DEALLEDGER_KAFKA__SSL_CA_LOCATION", "/etc/ca.pem"),
            ("DEALLEDGER_KAFKA_CONFIG", "/not/a/setting"),
        ]))
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("sasl.password".to_string(), "s3cret".to_string()),
                ("ssl.ca.location".to_string(), "/etc/ca.pem".to_string()),
            ]
        );
        assert_eq!(
            env_var_for("sasl.password"),
            "DEALLEDGER_KAFKA__SASL_PASSWORD"
        );
        for bad in ["DEALLEDGER_KAFKA__", "DEALLEDGER_KAFKA__SASL-PASSWORD"] {
            let err = settings_from_env(env(&[(bad, "s3cret")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(bad), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn secrets_on_the_command_line_are_refused_without_echoing_them() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
        ] {
            let arg = format!("{key}=Tr0ub4dor&3");
            let mut s = KafkaSettings::new("h:1");
            s.overrides
                .push(KafkaSettings::parse_override(&arg).unwrap());
            let err = s.client_config_with_env(&[], env(&[])).unwrap_err();
            assert!(
                matches!(err, SettingsError::SecretOnCommandLine { .. }),
                "{key}: {err:?}"
            );
            let text = err.to_string();
            assert!(!text.contains("Tr0ub4dor"), "{text}");
            assert!(text.contains(key), "{text}");
            assert!(text.contains("--kafka-config"), "{text}");
            assert!(text.contains(&env_var_for(key)), "{text}");
            assert!(!format!("{err:?}").contains("Tr0ub4dor"));
        }
        // Non-secret settings are fine on the command line.
        let mut s = KafkaSettings::new("h:1");
        s.overrides
            .push(KafkaSettings::parse_override("sasl.username=alice").unwrap());
        assert!(s.client_config_with_env(&[], env(&[])).is_ok());
    }

    #[test]
    fn secret_values_are_redacted_for_logging() {
        assert_eq!(shown_value("sasl.password", "hunter2"), REDACTED);
        assert_eq!(shown_value("SSL.KEY.PASSWORD", "hunter2"), REDACTED);
        assert_eq!(
            shown_value("sasl.oauthbearer.assertion.private.key.passphrase", "x"),
            REDACTED
        );
        assert_eq!(shown_value("sasl.username", "alice"), "alice");
        assert_eq!(shown_value("ssl.ca.location", "/ca.pem"), "/ca.pem");
    }

    /// Captures what `client_config` logs at debug level.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn secret_values_never_reach_the_log() {
        let dir = temp_dir("log");
        let file = dir.join("client.properties");
        std::fs::write(&file, "sasl.password=file-hunter2\nsasl.username=alice\n").unwrap();
        let mut s = KafkaSettings::new("h:1");
        s.config_file = Some(file);
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            s.client_config_with_env(
                &[],
                env(&[("DEALLEDGER_KAFKA__SSL_KEY_PASSWORD", "env-hunter2")]),
            )
            .unwrap();
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("sasl.username"), "{log}");
        assert!(log.contains("alice"), "{log}");
        assert!(log.contains("sasl.password"), "{log}");
        assert!(log.contains(REDACTED), "{log}");
        assert!(!log.contains("hunter2"), "{log}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_lines_are_reported_with_their_number_but_not_their_text() {
        let dir = temp_dir("bad");
        let file = dir.join("bad.properties");
        std::fs::write(&file, "a=1\nsasl.password: hunter2\n").unwrap();
        let mut s = KafkaSettings::new("h:1");
        s.config_file = Some(file);
        let err = s
            .client_config_with_env(&[], env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(KafkaSettings::parse_override("novalue").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn oversized_config_files_are_refused() {
        let dir = temp_dir("big");
        let file = dir.join("big.properties");
        std::fs::write(
            &file,
            "a=1\n".repeat(MAX_CONFIG_FILE_BYTES as usize / 4 + 1),
        )
        .unwrap();
        let mut s = KafkaSettings::new("h:1");
        s.config_file = Some(file);
        let err = s.client_config_with_env(&[], env(&[])).unwrap_err();
        assert!(matches!(err, SettingsError::TooLarge { .. }), "{err:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn security_failures_are_recognised() {
        let auth = SecurityFailure::classify(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "sasl_ssl://127.0.0.1:19094/bootstrap: SASL authentication error: Authentication \
             failed during authentication due to invalid credentials with SASL mechanism \
             SCRAM-SHA-512 (after 305ms in state AUTH_REQ)",
        )
        .expect("authentication failure");
        let text = auth.to_string();
        assert!(
            text.contains("authentication failed at broker 127.0.0.1:19094"),
            "{text}"
        );
        assert!(text.contains("sasl.password"), "{text}");

        let tls = SecurityFailure::classify(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "sasl_ssl://localhost:19094/bootstrap: SSL handshake failed: \
             error:0A000086:SSL routines::certificate verify failed: broker certificate could \
             not be verified, verify that ssl.ca.location is correctly configured",
        )
        .expect("untrusted certificate");
        let text = tls.to_string();
        assert!(
            text.contains("broker localhost:19094 is not trusted"),
            "{text}"
        );
        assert!(text.contains("ssl.ca.location"), "{text}");

        // Ordinary outages are retried, not fatal.
        assert_eq!(
            SecurityFailure::classify(
                &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
                "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
            ),
            None
        );
        assert_eq!(
            SecurityFailure::classify(
                &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
                "1/1 brokers are down",
            ),
            None
        );
        let logged = SecurityFailure::from_log(
            "FAIL",
            "[thrd:sasl_ssl://127.0.0.1:19094/bootstrap]: sasl_ssl://127.0.0.1:19094/bootstrap: \
             SASL authentication error: Authentication failed during authentication due to \
             invalid credentials with SASL mechanism SCRAM-SHA-512",
        );
        assert!(
            matches!(&logged, Some(SecurityFailure::Authentication { broker, .. }) if broker == "127.0.0.1:19094"),
            "{logged:?}"
        );
        let logged = SecurityFailure::from_log(
            "FAIL",
            "[thrd:sasl_ssl://127.0.0.1:19094/bootstrap]: sasl_ssl://127.0.0.1:19094/bootstrap: \
             SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
        );
        assert!(
            matches!(logged, Some(SecurityFailure::UntrustedCertificate { .. })),
            "{logged:?}"
        );
        assert_eq!(
            SecurityFailure::from_log(
                "FAIL",
                "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to \
                 ipv4#127.0.0.1:9092 failed: Connection refused"
            ),
            None
        );
        assert_eq!(
            SecurityFailure::from_log("CONFWARN", "authentication failed"),
            None
        );
        assert_eq!(
            split_broker("no broker here"),
            ("(unknown)".to_string(), "no broker here".to_string())
        );
    }
}
