//! The compliance query commands: `deal show`, `deal history`, `deals list`,
//! `locks active`, `findings`, `stats`.
//!
//! Each works offline on a stopped ledger (`--data DIR`, the state loaded from
//! its latest snapshot plus the entries after it) or against the running
//! daemon (`--server URL`, bearer token from `DEALLEDGER_TOKEN`). Both paths
//! produce the same [`crate::query`] structs, so `--json` prints the same
//! document either way. Long results are walked page by page to the end,
//! unless `--limit`/`--cursor` ask for one page.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::table::{Align, Table};
use super::{DEFAULT_DATA_DIR, EXIT_BAD_INPUT};
use crate::event::{Id, Timestamp};
use crate::ledger::LedgerState;
use crate::query::{
    self, DealFilter, DealShow, DealSummary, Finding, FindingFilter, HistoryEntry, LockInfo,
    MAX_PAGE_SIZE, Page, PageRequest, QueryError, Stats,
};
use crate::replay::parse_time;
use crate::store::Store;

/// Timeout of one HTTP request to the server.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Most pages one command walks (a guard against a server that never ends).
const MAX_PAGES: usize = 1_000_000;

/// Where the answers come from.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Ledger folder to read (stopped ledger; sled allows one process)
    /// [default: dealledger-data]. Example: --data ./ledger
    #[arg(
        long,
        env = "DEALLEDGER_DATA",
        value_name = "DIR",
        conflicts_with = "server"
    )]
    data: Option<PathBuf>,
    /// Ask the running daemon instead, e.g. --server http://127.0.0.1:8080.
    /// The bearer token is read from the environment variable DEALLEDGER_TOKEN.
    #[arg(long, env = "DEALLEDGER_SERVER", value_name = "URL")]
    server: Option<String>,
    /// PEM file of the CA (or self-signed certificate) to trust for an
    /// https --server.
    #[arg(long, env = "DEALLEDGER_SERVER_CA", value_name = "FILE")]
    server_ca: Option<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// Paging of long results.
#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Return one page of at most N items (1..=1000) instead of all.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Continue after this cursor (the `next_cursor` of an earlier page).
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
}

/// `dealledger deal ...`
#[derive(Debug, Subcommand)]
pub enum DealCommand {
    /// A deal's current state, parties, accepted terms and the locks that
    /// bind its parties, each citing the entries behind it.
    ///
    /// Example: dealledger deal show google-openai-2025 --data ./ledger
    Show {
        /// The deal's id.
        id: Id,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Every entry of a deal in ledger order, accepted or rejected (with
    /// the reason), with stream, seq and hash.
    ///
    /// Example: dealledger deal history google-openai-2025 --json
    History {
        /// The deal's id.
        id: Id,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// `dealledger deals ...`
#[derive(Debug, Subcommand)]
pub enum DealsCommand {
    /// Deals in id order, filtered.
    ///
    /// Example: dealledger deals list --party openai --status finalized
    List {
        /// Only deals this party is a party of.
        #[arg(long, value_name = "PARTY")]
        party: Option<Id>,
        /// Only deals in this status: negotiating, agreed, finalized, terminated.
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
        /// Only deals active at or after TIME (their last event is not earlier).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        from: Option<Timestamp>,
        /// Only deals opened before TIME.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        to: Option<Timestamp>,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// `dealledger locks ...`
#[derive(Debug, Subcommand)]
pub enum LocksCommand {
    /// Who held which exclusivity lock over whom at TIME: scope, since when,
    /// granted by which deal (with the granting entry).
    ///
    /// Example: dealledger locks active --at 2025-01-15
    Active {
        /// The business time (RFC 3339, or a date: the start of that day, UTC).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Timestamp,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// Arguments of `dealledger findings`.
#[derive(Debug, Args)]
pub struct FindingsArgs {
    /// Only findings at or after TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    from: Option<Timestamp>,
    /// Only findings before TIME.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to: Option<Timestamp>,
    /// Only findings of this kind: finalized_during_exclusive_lock,
    /// time_backwards, backdated, terms_mismatch, activity_after_termination,
    /// producer_rejections.
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Report events whose business time is more than this before Kafka's
    /// record timestamp (e.g. 36h, 7d). Not checked without it.
    #[arg(long, value_name = "DURATION")]
    max_backdate: Option<String>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    page: PageArgs,
}

/// Arguments of `dealledger stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    page: PageArgs,
}

/// Where queries are answered.
enum Source {
    Offline {
        store: Store,
        state: Box<LedgerState>,
    },
    Server(Client),
}

/// A client of the daemon's `/v1` API.
struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

/// A query that failed, with the exit code it deserves.
struct Failure {
    code: u8,
    message: String,
}

impl From<QueryError> for Failure {
    fn from(e: QueryError) -> Self {
        let code = match e {
            QueryError::BadParameter { .. } => EXIT_BAD_INPUT,
            _ => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl SourceArgs {
    fn open(&self) -> anyhow::Result<Source> {
        if let Some(server) = &self.server {
            return Ok(Source::Server(Client::new(
                server,
                self.server_ca.as_ref(),
            )?));
        }
        let dir = self
            .data
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let store = Store::open_existing(&dir)?;
        let state = Box::new(store.load_state()?);
        Ok(Source::Offline { store, state })
    }
}

impl Client {
    fn new(base: &str, ca: Option<&PathBuf>) -> anyhow::Result<Client> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the server CA file {}", ca.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            anyhow::ensure!(
                !certs.is_empty(),
                "{} holds no PEM certificate; pass the server's CA certificate",
                ca.display()
            );
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::from(certs))
                    .build(),
            );
        }
        let token = std::env::var("DEALLEDGER_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        Ok(Client {
            agent: config.build().into(),
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// `GET path?params` and its JSON body as `T`.
    fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<T, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        for (k, v) in params {
            request = request.query(*k, v);
        }
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let failure = |message: String| Failure { code: 1, message };
        let mut response = request
            .call()
            .map_err(|e| failure(format!("cannot reach the server at {url}: {e}")))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| failure(format!("{url}: cannot read the answer: {e}")))?;
        if status == 200 {
            return serde_json::from_str(&body).map_err(|e| {
                failure(format!(
                    "{url}: the answer is not what this client expects: {e}"
                ))
            });
        }
        let error = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        let hint = match status {
            401 => " (set DEALLEDGER_TOKEN to a token the server accepts)",
            403 => " (this token is not allowed this query)",
            _ => "",
        };
        Err(Failure {
            code: if status == 400 { EXIT_BAD_INPUT } else { 1 },
            message: format!("server answered {status}: {error}{hint}"),
        })
    }
}

fn page_params(page: &PageRequest) -> Vec<(&'static str, String)> {
    let mut params = Vec::new();
    if let Some(limit) = page.limit {
        params.push(("limit", limit.to_string()));
    }
    if let Some(cursor) = &page.cursor {
        params.push(("cursor", cursor.clone()));
    }
    params
}

/// Walks every page from `first` on (or returns the one page asked for).
fn walk<T>(
    args: &PageArgs,
    mut fetch: impl FnMut(&PageRequest) -> Result<Page<T>, Failure>,
) -> Result<Page<T>, Failure> {
    let one_page = args.limit.is_some() || args.cursor.is_some();
    let mut request = PageRequest {
        limit: Some(args.limit.unwrap_or(MAX_PAGE_SIZE)),
        cursor: args.cursor.clone(),
    };
    let mut all = fetch(&request)?;
    if one_page {
        return Ok(all);
    }
    for _ in 0..MAX_PAGES {
        let Some(cursor) = all.next_cursor.take() else {
            return Ok(all);
        };
        request.cursor = Some(cursor);
        let page = fetch(&request)?;
        all.items.extend(page.items);
        all.next_cursor = page.next_cursor;
    }
    Err(Failure {
        code: 1,
        message: format!("more than {MAX_PAGES} pages; use --limit and --cursor"),
    })
}

/// Runs `query`, prints its answer as JSON or with `table`, maps failures.
fn answer<T: Serialize>(
    json: bool,
    query: impl FnOnce() -> Result<T, Failure>,
    table: impl FnOnce(&T, &mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<ExitCode> {
    match query() {
        Ok(value) => {
            let stdout = std::io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            if json {
                serde_json::to_writer_pretty(&mut out, &value)?;
                writeln!(out)?;
            } else {
                table(&value, &mut out)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            Ok(ExitCode::from(f.code))
        }
    }
}

fn time_param(name: &'static str, t: Option<Timestamp>) -> Option<(&'static str, String)> {
    t.map(|t| (name, t.to_string()))
}

/// `dealledger deal show|history`.
pub fn deal(command: DealCommand) -> anyhow::Result<ExitCode> {
    match command {
        DealCommand::Show { id, source } => {
            let json = source.json;
            let src = source.open()?;
            answer(
                json,
                || match &src {
                    Source::Offline { state, .. } => Ok(query::deal_show(state, &id)?),
                    Source::Server(c) => c.get::<DealShow>(&format!("/v1/deals/{id}"), &[]),
                },
                print_deal_show,
            )
        }
        DealCommand::History { id, source, page } => {
            let json = source.json;
            let src = source.open()?;
            answer(
                json,
                || {
                    walk(&page, |p| match &src {
                        Source::Offline { state, store } => {
                            Ok(query::deal_history(state, store, &id, p)?)
                        }
                        Source::Server(c) => c.get::<Page<HistoryEntry>>(
                            &format!("/v1/deals/{id}/history"),
                            &page_params(p),
                        ),
                    })
                },
                print_history,
            )
        }
    }
}

/// `dealledger deals list`.
pub fn deals(command: DealsCommand) -> anyhow::Result<ExitCode> {
    let DealsCommand::List {
        party,
        status,
        from,
        to,
        source,
        page,
    } = command;
    let json = source.json;
    let src = source.open()?;
    answer(
        json,
        || {
            let filter = DealFilter {
                party: party.clone(),
                status: status.as_deref().map(query::parse_status).transpose()?,
                from,
                to,
            };
            walk(&page, |p| match &src {
                Source::Offline { state, .. } => Ok(query::deals_list(state, &filter, p)?),
                Source::Server(c) => {
                    let mut params = page_params(p);
                    params.extend(party.as_ref().map(|v| ("party", v.to_string())));
                    params.extend(status.as_ref().map(|v| ("status", v.clone())));
                    params.extend(time_param("from", from));
                    params.extend(time_param("to", to));
                    c.get::<Page<DealSummary>>("/v1/deals", &params)
                }
            })
        },
        print_deals,
    )
}

/// `dealledger locks active`.
pub fn locks(command: LocksCommand) -> anyhow::Result<ExitCode> {
    let LocksCommand::Active { at, source, page } = command;
    let json = source.json;
    let src = source.open()?;
    answer(
        json,
        || {
            walk(&page, |p| match &src {
                Source::Offline { state, .. } => Ok(query::locks_active(state, at, p)?),
                Source::Server(c) => {
                    let mut params = page_params(p);
                    params.push(("at", at.to_string()));
                    c.get::<Page<LockInfo>>("/v1/locks/active", &params)
                }
            })
        },
        print_locks,
    )
}

/// `dealledger findings`.
pub fn findings(args: FindingsArgs) -> anyhow::Result<ExitCode> {
    let json = args.source.json;
    let src = args.source.open()?;
    answer(
        json,
        || {
            let filter = FindingFilter {
                from: args.from,
                to: args.to,
                kind: args.kind.clone(),
                max_backdate_ms: args
                    .max_backdate
                    .as_deref()
                    .map(query::parse_duration_ms)
                    .transpose()?,
            };
            walk(&args.page, |p| match &src {
                Source::Offline { state, store } => Ok(query::findings(state, store, &filter, p)?),
                Source::Server(c) => {
                    let mut params = page_params(p);
                    params.extend(time_param("from", args.from));
                    params.extend(time_param("to", args.to));
                    params.extend(args.kind.as_ref().map(|v| ("kind", v.clone())));
                    params.extend(
                        args.max_backdate
                            .as_ref()
                            .map(|v| ("max_backdate", v.clone())),
                    );
                    c.get::<Page<Finding>>("/v1/findings", &params)
                }
            })
        },
        print_findings,
    )
}

/// `dealledger stats`.
pub fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let json = args.source.json;
    let src = args.source.open()?;
    answer(
        json,
        || {
            let mut overall = None;
            let deals = walk(&args.page, |p| {
                let stats = match &src {
                    Source::Offline { state, .. } => query::stats(state, p)?,
                    Source::Server(c) => c.get::<Stats>("/v1/stats", &page_params(p))?,
                };
                overall.get_or_insert(stats.overall);
                Ok(stats.deals)
            })?;
            Ok(Stats {
                overall: overall.expect("at least one page was read"),
                deals,
            })
        },
        print_stats,
    )
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

fn cited(e: &Option<query::EntryRef>) -> String {
    e.as_ref().map_or_else(
        || "-".to_string(),
        |e| format!("stream {} seq {} hash {}", e.stream, e.seq, e.hash),
    )
}

fn print_deal_show(d: &DealShow, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "deal       {}", d.id)?;
    writeln!(out, "status     {}", d.status)?;
    writeln!(out, "scope      {}", d.scope)?;
    let partners = if d.parties.partners.is_empty() {
        String::new()
    } else {
        format!(
            ", partners {}",
            d.parties
                .partners
                .iter()
                .map(Id::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    writeln!(
        out,
        "parties    customer {}, provider {}{partners}",
        d.parties.customer, d.parties.provider
    )?;
    writeln!(out, "opened     {}  ({})", d.opened_at, cited(&d.opened_by))?;
    if let Some(a) = &d.agreed {
        writeln!(
            out,
            "agreed     {} proposal {} accepted by {}  ({})",
            a.at,
            a.proposal_id,
            a.accepted_by,
            cited(&a.entry)
        )?;
    }
    if let Some(f) = &d.finalized {
        writeln!(
            out,
            "finalized  {} proposal {}, effective {}  ({})",
            f.at,
            f.proposal_id,
            f.effective_date,
            cited(&f.entry)
        )?;
    }
    if let Some(t) = &d.current_terms {
        writeln!(
            out,
            "terms      {} {} for {} {} minor units, {} to {}  ({})",
            t.capacity.quantity,
            serde_json::to_value(t.capacity.unit)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            t.price.amount_minor,
            t.price.currency,
            t.start,
            t.end,
            cited(&d.current_terms_from)
        )?;
    }
    writeln!(out, "amendments {}", d.amendments)?;
    if let Some(t) = &d.terminated {
        writeln!(
            out,
            "terminated {} by {}: {}  ({})",
            t.at,
            t.by,
            t.reason,
            cited(&t.entry)
        )?;
    }
    writeln!(
        out,
        "events     {} folded, {} entries (see `deal history`)",
        d.event_count, d.entries
    )?;
    writeln!(out, "last       {}", cited(&d.last_event))?;
    writeln!(
        out,
        "\nlocks granted by this deal: {}",
        d.locks_granted.len()
    )?;
    for l in &d.locks_granted {
        print_lock_line(l, out)?;
    }
    writeln!(
        out,
        "\nlocks in force in scope {} binding its parties: {}{}",
        d.scope,
        d.locks_binding_parties_total,
        if d.locks_binding_parties_total > d.locks_binding_parties.len() {
            format!(
                " (first {} shown; `locks active` lists all)",
                d.locks_binding_parties.len()
            )
        } else {
            String::new()
        }
    )?;
    for l in &d.locks_binding_parties {
        print_lock_line(l, out)?;
    }
    Ok(())
}

fn print_lock_line(l: &LockInfo, out: &mut dyn Write) -> std::io::Result<()> {
    let ended = l
        .ended
        .as_ref()
        .map_or_else(String::new, |e| format!(", ended {} ({})", e.at, e.reason));
    writeln!(
        out,
        "  {}/{}: {} holds {} over {} in {} since {}{}{}  (granted: {})",
        l.deal_id,
        l.lock_id,
        l.holder,
        l.kind,
        l.bound_party,
        l.scope,
        l.valid_from,
        l.valid_until
            .map_or_else(String::new, |u| format!(" until {u}")),
        ended,
        cited(&l.granted_by)
    )
}

fn print_history(page: &Page<HistoryEntry>, out: &mut dyn Write) -> std::io::Result<()> {
    let mut table = Table::new(&[
        ("#", Align::Right),
        ("stream", Align::Right),
        ("seq", Align::Right),
        ("type", Align::Left),
        ("time", Align::Left),
        ("verdict", Align::Left),
        ("hash", Align::Left),
        ("reason", Align::Left),
    ]);
    for h in &page.items {
        table.row(vec![
            h.position.to_string(),
            h.entry.stream.to_string(),
            h.entry.seq.to_string(),
            opt(&h.event_type),
            opt(&h.time),
            h.verdict.to_string(),
            h.entry.hash[..16].to_string(),
            h.reason.clone().unwrap_or_default(),
        ]);
    }
    table.write_to(out)?;
    print_next(&page.next_cursor, out)
}

fn print_next(next: &Option<String>, out: &mut dyn Write) -> std::io::Result<()> {
    if let Some(c) = next {
        writeln!(out, "more: --cursor {c}")?;
    }
    Ok(())
}

fn print_deals(page: &Page<DealSummary>, out: &mut dyn Write) -> std::io::Result<()> {
    let mut table = Table::new(&[
        ("deal", Align::Left),
        ("status", Align::Left),
        ("scope", Align::Left),
        ("customer", Align::Left),
        ("provider", Align::Left),
        ("opened", Align::Left),
        ("events", Align::Right),
    ]);
    for d in &page.items {
        table.row(vec![
            d.id.to_string(),
            d.status.to_string(),
            d.scope.to_string(),
            d.parties.customer.to_string(),
            d.parties.provider.to_string(),
            d.opened_at.to_string(),
            d.event_count.to_string(),
        ]);
    }
    table.write_to(out)?;
    writeln!(out, "{} deal(s)", page.items.len())?;
    print_next(&page.next_cursor, out)
}

fn print_locks(page: &Page<LockInfo>, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{} lock(s) in force", page.items.len())?;
    for l in &page.items {
        print_lock_line(l, out)?;
    }
    print_next(&page.next_cursor, out)
}

fn print_findings(page: &Page<Finding>, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{} finding(s)", page.items.len())?;
    for f in &page.items {
        writeln!(out, "\n[{}] {}  {}", f.kind, f.at, f.explanation)?;
        for e in &f.entries {
            writeln!(
                out,
                "    entry stream {} seq {} hash {}",
                e.stream, e.seq, e.hash
            )?;
        }
        if f.count as usize > f.entries.len() {
            writeln!(out, "    ... {} in all", f.count)?;
        }
    }
    print_next(&page.next_cursor, out)
}

fn print_stats(s: &Stats, out: &mut dyn Write) -> std::io::Result<()> {
    let o = &s.overall;
    writeln!(
        out,
        "entries {}: {} accepted, {} rejected, {} duplicate",
        o.entries, o.verdicts.accepted, o.verdicts.rejected, o.verdicts.duplicate
    )?;
    for (status, n) in &o.deals_by_status {
        writeln!(out, "deals {status}: {n}")?;
    }
    let days = |s: &Option<i64>| {
        s.map_or_else(
            || "-".into(),
            |s| format!("{:.1} days", s as f64 / 86_400.0),
        )
    };
    writeln!(
        out,
        "opening to finalization: mean {}, median {} ({} finalized)",
        days(&o.mean_seconds_to_finalize),
        days(&o.median_seconds_to_finalize),
        o.finalized
    )?;
    if let Some(r) = o.mean_proposal_rounds {
        writeln!(out, "proposal rounds per deal: mean {r:.2}")?;
    }
    writeln!(out, "events by type:")?;
    for (t, n) in &o.events_by_type {
        writeln!(out, "  {t:<30} {n}")?;
    }
    writeln!(out)?;
    let mut table = Table::new(&[
        ("deal", Align::Left),
        ("status", Align::Left),
        ("to finalize", Align::Right),
        ("rounds", Align::Right),
        ("accepted", Align::Right),
        ("rejected", Align::Right),
        ("duplicate", Align::Right),
    ]);
    for d in &s.deals.items {
        table.row(vec![
            d.id.to_string(),
            d.status.to_string(),
            days(&d.seconds_to_finalize),
            d.proposal_rounds.to_string(),
            d.verdicts.accepted.to_string(),
            d.verdicts.rejected.to_string(),
            d.verdicts.duplicate.to_string(),
        ]);
    }
    table.write_to(out)?;
    print_next(&s.deals.next_cursor, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::Status;
    use crate::query::DealSummary;
    use crate::replay::PartiesView;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    #[test]
    fn the_deals_table_keeps_its_columns_whatever_the_ids_lengths() {
        let at = Timestamp::parse("2025-01-21T20:00:00Z").unwrap();
        let summary = |deal: &str, customer: &str| DealSummary {
            id: id(deal),
            status: Status::Finalized,
            scope: id("cloud-compute"),
            parties: PartiesView {
                customer: id(customer),
                provider: id("oracle"),
                partners: vec![],
            },
            opened_at: at,
            finalized_at: None,
            terminated_at: None,
            last_event_at: at,
            event_count: 7,
            last_event: None,
        };
        let page = Page {
            items: vec![
                summary("stargate-2025", "openai"),
                summary("d", "a-longer-customer"),
            ],
            next_cursor: None,
        };
        let mut out = Vec::new();
        print_deals(&page, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().take(3).collect();
        for column in ["status", "scope", "customer", "provider", "opened"] {
            let at = lines[0].find(column).unwrap();
            for row in &lines[1..] {
                // The value starts where its header does, after a space.
                assert_ne!(&row[at..=at], " ", "{column} in {row:?}\n{text}");
                assert_eq!(&row[at - 1..at], " ", "{column} in {row:?}\n{text}");
            }
        }
        assert!(lines[1].starts_with("stargate-2025  finalized  cloud-compute  openai    "));
    }
}
