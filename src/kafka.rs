//! Kafka client settings shared by the producer and the ingester.
//!
//! Every Kafka client dealledger creates is configured here, from three
//! layers applied in order: dealledger's own defaults for the role, a
//! librdkafka properties file (`--kafka-config FILE`, one `key=value` per
//! line; the place for security settings such as SASL passwords, which must
//! never be passed on the command line), and explicit `-X key=value`
//! overrides. Values of keys that look secret are never logged.

use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;

/// Default bootstrap servers when neither `--brokers` nor `DEALLEDGER_BROKERS` is given.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// Default topic of deal events.
pub const DEFAULT_TOPIC: &str = "deal-events";

/// Where and how to reach Kafka.
#[derive(Clone, Debug, Default)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// A librdkafka properties file, if any.
    pub config_file: Option<PathBuf>,
    /// `key=value` overrides, applied last.
    pub overrides: Vec<(String, String)>,
}

/// Why Kafka settings could not be assembled.
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
    /// A line of the properties file is not `key=value`.
    #[error("Kafka config file {path}, line {line}: expected key=value, found {text:?}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending line (secret values are never part of a syntax error).
        text: String,
    },
    /// A `-X` override is not `key=value`.
    #[error("-X {0:?}: expected key=value (a librdkafka setting)")]
    Override(String),
}

impl KafkaSettings {
    /// Settings for `brokers`, with no file and no overrides.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            ..Default::default()
        }
    }

    /// Parses a `-X key=value` argument into an override.
    pub fn parse_override(arg: &str) -> Result<(String, String), SettingsError> {
        match arg.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(SettingsError::Override(arg.to_string())),
        }
    }

    /// Builds a librdkafka config: `defaults`, then the file, then overrides.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig, SettingsError> {
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
        for (k, v) in &self.overrides {
            config.set(k, v);
        }
        for (k, v) in config.config_map() {
            let shown: &str = if is_secret(k) { "<redacted>" } else { v };
            tracing::debug!(key = %k, value = %shown, "kafka setting");
        }
        Ok(config)
    }
}

/// True for librdkafka keys whose values must never be logged.
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".key.pem")
        || k.contains("sasl.oauthbearer.config")
}

/// Reads a Java-style properties file: `key=value` lines, `#` and `!` comments.
fn read_properties(path: &Path) -> Result<Vec<(String, String)>, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                out.push((k.trim().to_string(), v.trim().to_string()))
            }
            _ => {
                return Err(SettingsError::Syntax {
                    path: path.to_path_buf(),
                    line: i + 1,
                    text: line.chars().take(40).collect(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("dealledger-kafka-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.properties");
        std::fs::write(&file, "# comment\nlinger.ms = 7\nsasl.password=hunter2\n").unwrap();
        let mut s = KafkaSettings::new("h:1");
        s.config_file = Some(file);
        s.overrides
            .push(KafkaSettings::parse_override("linger.ms=9").unwrap());
        let c = s
            .client_config(&[("linger.ms", "5"), ("acks", "all")])
            .unwrap();
        assert_eq!(c.get("linger.ms"), Some("9"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert!(is_secret("sasl.password"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let dir = std::env::temp_dir().join(format!("dealledger-kafka-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.properties");
        std::fs::write(&file, "a=1\nnot a setting\n").unwrap();
        let mut s = KafkaSettings::new("h:1");
        s.config_file = Some(file);
        let err = s.client_config(&[]).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(KafkaSettings::parse_override("novalue").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
