//! Bearer-token authentication of the HTTP API.
//!
//! Why it exists: the query API shows every deal, lock and finding of the
//! ledger, and `/v1/export` hands out the whole ledger, so every `/v1`
//! request must carry a token (`Authorization: Bearer TOKEN`), and a token
//! may be limited to some routes ([`Scope`]).
//!
//! Tokens come from a tokens file (`serve --tokens-file FILE`) and from the
//! environment variable [`TOKENS_ENV`] (comma-separated; every scope). The
//! tokens file holds one token per line, optionally followed by the scopes
//! it is allowed; blank lines and lines starting with `#` are ignored:
//!
//! ```text
//! # auditors: everything
//! 3f9c1e0b7a5d4c2e8f6a1b3c5d7e9f0a
//! # the dashboard: deals and locks only
//! dashboard-7d2f9a41c3e85b60 allow=deals,history,locks
//! ```
//!
//! Only the blake3 hash of each token is kept in memory; a presented token
//! is hashed and compared with every known hash in constant time
//! (`blake3::Hash`'s equality), without stopping at a match. Tokens are
//! never logged and never appear in an error message (a bad line of the
//! tokens file is named by its line number).
//!
//! Without any token the API is locked: every `/v1` request is answered
//! with 401, so a daemon started without tokens exposes nothing.

use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};

/// Environment variable holding comma-separated tokens allowed every route.
pub const TOKENS_ENV: &str = "DEALLEDGER_API_TOKENS";

/// Most tokens the API accepts (file and environment together).
pub const MAX_TOKENS: usize = 1_024;

/// Shortest token accepted, in characters: shorter ones are guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Longest token accepted, in characters.
pub const MAX_TOKEN_CHARS: usize = 256;

/// Largest tokens file read, in bytes.
pub const MAX_TOKENS_FILE_BYTES: u64 = 1 << 20;

/// Characters a token may hold: RFC 6750's `b64token` alphabet.
pub const TOKEN_RULE: &str = "16-256 characters from A-Z a-z 0-9 - . _ ~ + / =";

/// A group of routes a token may be allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `GET /v1/deals` and `GET /v1/deals/{id}`.
    Deals,
    /// `GET /v1/deals/{id}/history`.
    History,
    /// `GET /v1/locks/active`.
    Locks,
    /// `GET /v1/findings`.
    Findings,
    /// `GET /v1/stats`.
    Stats,
    /// `GET /v1/export`.
    Export,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 6] = [
        Scope::Deals,
        Scope::History,
        Scope::Locks,
        Scope::Findings,
        Scope::Stats,
        Scope::Export,
    ];

    /// The scope's name in a tokens file.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Deals => "deals",
            Scope::History => "history",
            Scope::Locks => "locks",
            Scope::Findings => "findings",
            Scope::Stats => "stats",
            Scope::Export => "export",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|sc| sc.name() == s)
    }

    /// The scope a request path needs: `None` for paths any valid token may
    /// read (`/v1/openapi.json`, unknown `/v1` paths, which answer 404).
    pub fn of_path(path: &str) -> Option<Scope> {
        let mut parts = path.trim_start_matches('/').split('/');
        if parts.next() != Some("v1") {
            return None;
        }
        let rest: Vec<&str> = parts.collect();
        match rest.as_slice() {
            ["deals"] | ["deals", _] => Some(Scope::Deals),
            ["deals", _, "history"] => Some(Scope::History),
            ["locks", ..] => Some(Scope::Locks),
            ["findings"] => Some(Scope::Findings),
            ["stats"] => Some(Scope::Stats),
            ["export"] => Some(Scope::Export),
            _ => None,
        }
    }
}

/// Why the tokens could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The tokens file could not be read.
    #[error("cannot read the tokens file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The tokens file is larger than [`MAX_TOKENS_FILE_BYTES`].
    #[error("the tokens file {} is larger than {MAX_TOKENS_FILE_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line of the tokens file is malformed (the token itself is never shown).
    #[error("tokens file {} line {line}: {reason}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An item of [`TOKENS_ENV`] is malformed.
    #[error("{TOKENS_ENV} item {item}: {reason}")]
    Env {
        /// Position in the comma-separated list, from 1.
        item: usize,
        /// What is wrong.
        reason: String,
    },
    /// More than [`MAX_TOKENS`] tokens.
    #[error("more than {MAX_TOKENS} API tokens; the API accepts at most {MAX_TOKENS}")]
    TooMany,
}

/// One known token: its hash, what it may read, and where it came from.
struct Token {
    digest: blake3::Hash,
    scopes: u8,
}

/// The tokens the API accepts, and whether `/health` and `/metrics` need one.
#[derive(Default)]
pub struct Auth {
    tokens: Vec<Token>,
    /// Whether `/health` and `/metrics` need a valid token too (any scope).
    pub protect_operational: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("protect_operational", &self.protect_operational)
            .finish()
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token is configured at all.
    NoTokensConfigured,
    /// The request carries no bearer token.
    Missing,
    /// The `Authorization` header is not `Bearer TOKEN`.
    Malformed,
    /// The token is not one of the configured tokens.
    Unknown,
    /// The token is valid but not allowed this scope.
    Forbidden(Scope),
}

impl Denied {
    /// The answer: 401 with `WWW-Authenticate: Bearer`, or 403.
    pub fn into_error(self) -> ApiError {
        let unauthorized = |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, msg);
        match self {
            Denied::NoTokensConfigured => unauthorized(
                "this server has no API tokens configured, so every /v1 request is refused; start serve with --tokens-file FILE or DEALLEDGER_API_TOKENS",
            ),
            Denied::Missing => {
                unauthorized("no bearer token: send the header Authorization: Bearer TOKEN")
            }
            Denied::Malformed => {
                unauthorized("the Authorization header is not of the form Bearer TOKEN")
            }
            Denied::Unknown => unauthorized("the bearer token is not valid"),
            Denied::Forbidden(scope) => ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this token is not allowed the {} routes; add {} to its allow= list in the tokens file",
                    scope.name(),
                    scope.name()
                ),
            ),
        }
    }
}

fn check_token(token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if !(MIN_TOKEN_CHARS..=MAX_TOKEN_CHARS).contains(&n) {
        return Err(format!("a token has {n} characters; expected {TOKEN_RULE}"));
    }
    let ok = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b));
    if !ok {
        return Err(format!("a token holds a character outside {TOKEN_RULE}"));
    }
    Ok(())
}

fn parse_scopes(list: &str) -> Result<u8, String> {
    if list == "*" {
        return Ok(all_scopes());
    }
    let mut bits = 0u8;
    for name in list.split(',') {
        let scope = Scope::parse(name).ok_or_else(|| {
            let names: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
            format!(
                "unknown scope {name:?} in allow=; expected * or a comma-separated list of {}",
                names.join(", ")
            )
        })?;
        bits |= scope.bit();
    }
    Ok(bits)
}

fn all_scopes() -> u8 {
    Scope::ALL.iter().fold(0, |acc, s| acc | s.bit())
}

impl Auth {
    /// No tokens; `/health` and `/metrics` open unless `protect_operational`.
    pub fn new(protect_operational: bool) -> Self {
        Auth {
            tokens: Vec::new(),
            protect_operational,
        }
    }

    /// Number of tokens accepted.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is accepted (every `/v1` request gets 401).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn push(&mut self, token: &str, scopes: u8) -> Result<(), String> {
        if self.tokens.len() >= MAX_TOKENS {
            return Err(format!("more than {MAX_TOKENS} tokens"));
        }
        let digest = blake3::hash(token.as_bytes());
        if self.tokens.iter().any(|t| t.digest == digest) {
            return Err("this token is listed before; list each token once".into());
        }
        self.tokens.push(Token { digest, scopes });
        Ok(())
    }

    /// Adds the tokens of a tokens file (format in the module docs).
    pub fn add_file(&mut self, path: &Path) -> Result<(), TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_TOKENS_FILE_BYTES {
            return Err(TokenError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        self.add_file_text(path, &text)
    }

    /// Adds the tokens of a tokens file's text; `path` names it in errors.
    pub fn add_file_text(&mut self, path: &Path, text: &str) -> Result<(), TokenError> {
        for (i, line) in text.lines().enumerate() {
            let bad = |reason: String| TokenError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default();
            check_token(token).map_err(bad)?;
            let mut scopes = all_scopes();
            if let Some(word) = words.next() {
                let list = word.strip_prefix("allow=").ok_or_else(|| {
                    bad("after the token only allow=SCOPE,SCOPE,... may follow".into())
                })?;
                scopes = parse_scopes(list).map_err(bad)?;
            }
            if words.next().is_some() {
                return Err(bad(
                    "too many words: expected TOKEN [allow=SCOPE,...]".into()
                ));
            }
            self.push(token, scopes).map_err(|reason| {
                if self.tokens.len() >= MAX_TOKENS {
                    TokenError::TooMany
                } else {
                    bad(reason)
                }
            })?;
        }
        Ok(())
    }

    /// Adds the comma-separated tokens of [`TOKENS_ENV`], each allowed every
    /// route. Empty items are ignored.
    pub fn add_env_list(&mut self, list: &str) -> Result<(), TokenError> {
        for (i, token) in list.split(',').enumerate() {
            let token = token.trim();
            if token.is_empty() {
                continue;
            }
            let bad = |reason: String| TokenError::Env {
                item: i + 1,
                reason,
            };
            check_token(token).map_err(bad)?;
            self.push(token, all_scopes()).map_err(|reason| {
                if self.tokens.len() >= MAX_TOKENS {
                    TokenError::TooMany
                } else {
                    bad(reason)
                }
            })?;
        }
        Ok(())
    }

    /// Whether the request's `Authorization` header carries a token allowed
    /// `scope` (`None`: any valid token).
    pub fn check(&self, headers: &HeaderMap, scope: Option<Scope>) -> Result<(), Denied> {
        if self.tokens.is_empty() {
            return Err(Denied::NoTokensConfigured);
        }
        let value = headers.get(header::AUTHORIZATION).ok_or(Denied::Missing)?;
        let value = value.to_str().map_err(|_| Denied::Malformed)?;
        let (kind, token) = value.split_once(' ').ok_or(Denied::Malformed)?;
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(Denied::Malformed);
        }
        let token = token.trim();
        if token.len() > MAX_TOKEN_CHARS {
            return Err(Denied::Unknown);
        }
        let presented = blake3::hash(token.as_bytes());
        // Compare with every token, without stopping at a match.
        let mut scopes = 0u8;
        let mut found = false;
        for known in &self.tokens {
            let hit = known.digest == presented;
            found |= hit;
            scopes |= if hit { known.scopes } else { 0 };
        }
        if !found {
            return Err(Denied::Unknown);
        }
        match scope {
            Some(s) if scopes & s.bit() == 0 => Err(Denied::Forbidden(s)),
            _ => Ok(()),
        }
    }
}

/// The middleware in front of every route: `/v1/...` needs a token allowed
/// the route's [`Scope`]; `/health` and `/metrics` need any valid token
/// when [`Auth::protect_operational`] is set; anything else passes (and is
/// answered 404).
pub(super) async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let guarded = path == "/v1" || path.starts_with("/v1/");
    let operational = path == "/health" || path == "/metrics";
    if !(guarded || operational && state.auth.protect_operational) {
        return next.run(request).await;
    }
    let scope = if guarded { Scope::of_path(path) } else { None };
    match state.auth.check(request.headers(), scope) {
        Ok(()) => next.run(request).await,
        Err(denied) => denied.into_error().into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const ALL: &str = "all-scopes-token-0123456789";
    const DASH: &str = "dashboard-token-0123456789";

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn auth() -> Auth {
        let mut auth = Auth::new(false);
        auth.add_file_text(
            Path::new("tokens"),
            &format!("# comment\n\n{ALL}\n  {DASH} allow=deals,locks  \n"),
        )
        .unwrap();
        auth
    }

    #[test]
    fn tokens_are_checked_with_their_scopes() {
        let auth = auth();
        assert_eq!(auth.len(), 2);
        assert_eq!(auth.check(&bearer(ALL), Some(Scope::Export)), Ok(()));
        assert_eq!(auth.check(&bearer(DASH), Some(Scope::Deals)), Ok(()));
        assert_eq!(auth.check(&bearer(DASH), None), Ok(()));
        assert_eq!(
            auth.check(&bearer(DASH), Some(Scope::Export)),
            Err(Denied::Forbidden(Scope::Export))
        );
        assert_eq!(
            auth.check(&bearer("not-a-known-token-at-all"), None),
            Err(Denied::Unknown)
        );
        assert_eq!(auth.check(&HeaderMap::new(), None), Err(Denied::Missing));
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(auth.check(&basic, None), Err(Denied::Malformed));
        assert_eq!(
            Auth::new(false).check(&bearer(ALL), None),
            Err(Denied::NoTokensConfigured)
        );
    }

    #[test]
    fn bad_token_lines_are_named_without_the_token() {
        let mut auth = Auth::new(false);
        let err = auth
            .add_file_text(Path::new("t"), "# x\nshort\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("short"), "{err}");
        let err = auth
            .add_file_text(Path::new("t"), &format!("{ALL} allow=deals,nope\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("\"nope\""), "{err}");
        let err = Auth::new(false)
            .add_file_text(Path::new("t"), &format!("{ALL}\n{ALL}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && !err.contains(ALL), "{err}");
        let err = Auth::new(false)
            .add_env_list(&format!("{ALL}, bad token with spaces"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("item 2"), "{err}");
        let mut env = Auth::new(false);
        env.add_env_list(&format!(" {ALL} ,,{DASH}")).unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(env.check(&bearer(DASH), Some(Scope::Export)), Ok(()));
    }

    #[test]
    fn paths_map_to_scopes() {
        assert_eq!(Scope::of_path("/v1/deals"), Some(Scope::Deals));
        assert_eq!(Scope::of_path("/v1/deals/x"), Some(Scope::Deals));
        assert_eq!(Scope::of_path("/v1/deals/x/history"), Some(Scope::History));
        assert_eq!(Scope::of_path("/v1/locks/active"), Some(Scope::Locks));
        assert_eq!(Scope::of_path("/v1/findings"), Some(Scope::Findings));
        assert_eq!(Scope::of_path("/v1/stats"), Some(Scope::Stats));
        assert_eq!(Scope::of_path("/v1/export"), Some(Scope::Export));
        assert_eq!(Scope::of_path("/v1/openapi.json"), None);
    }
}
