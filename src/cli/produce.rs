//! `dealledger produce` and `dealledger validate`: JSONL deal events in,
//! validated, then (for produce) published to Kafka.
//!
//! Input is read twice, streaming, so memory does not grow with the file:
//! the first pass validates every line and remembers each valid line's deal
//! id (interned); the second pass sends the lines' bytes exactly as written.
//! Standard input is first spooled to an anonymous temporary file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{EXIT_BAD_INPUT, KafkaArgs};
use crate::event::{DealEvent, DecodeError, limits};
use crate::producer::BulkProducer;

/// Most invalid lines printed one by one; the rest are counted.
const MAX_REPORTED_LINES: usize = 1_000;

/// Arguments of `dealledger produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// JSONL file of CloudEvents deal events, one per line; `-` for standard input.
    #[arg(value_name = "FILE|-")]
    input: PathBuf,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Send the valid lines and report the invalid ones instead of sending nothing.
    #[arg(long, conflicts_with = "no_validate")]
    skip_invalid: bool,
    /// Send every line as-is, valid or not (keyed by its `subject` when it has
    /// one). For testing how the ledger records bad input.
    #[arg(long)]
    no_validate: bool,
    /// Print the summary as one JSON document.
    #[arg(long)]
    json: bool,
}

/// Arguments of `dealledger validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// JSONL file of CloudEvents deal events, one per line; `-` for standard input.
    #[arg(value_name = "FILE|-")]
    input: PathBuf,
    /// Print the result as one JSON document.
    #[arg(long)]
    json: bool,
}

/// One invalid line, as reported.
#[derive(Debug, Serialize)]
struct InvalidLine {
    line: u64,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    reason: String,
}

impl InvalidLine {
    fn new(line: u64, err: &DecodeError) -> Self {
        InvalidLine {
            line,
            kind: err.kind(),
            path: err.path().map(str::to_string),
            reason: err.to_string(),
        }
    }
}

/// The outcome of the validation pass.
struct Validation {
    /// Per line (index = line number - 1): index into `keys` of the deal id,
    /// or `None` for a blank or invalid line.
    line_keys: Vec<Option<u32>>,
    keys: Vec<String>,
    valid: u64,
    invalid_total: u64,
    invalid: Vec<InvalidLine>,
}

/// Reads JSONL with a bound on line length: a longer line is reported, not buffered.
struct BoundedLines<R> {
    reader: R,
    line: u64,
}

enum Line<'a> {
    Blank,
    Text(&'a [u8]),
    TooLong(usize),
}

impl<R: BufRead> BoundedLines<R> {
    fn new(reader: R) -> Self {
        BoundedLines { reader, line: 0 }
    }

    /// The next line (without its newline) and its 1-based number.
    fn next<'b>(&mut self, buf: &'b mut Vec<u8>) -> io::Result<Option<(u64, Line<'b>)>> {
        buf.clear();
        let mut total = 0usize;
        let mut seen_any = false;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            seen_any = true;
            let (part, done) = match memchr_newline(chunk) {
                Some(i) => (&chunk[..i], Some(i + 1)),
                None => (chunk, None),
            };
            total += part.len();
            if buf.len() <= limits::MAX_EVENT_BYTES {
                let room = limits::MAX_EVENT_BYTES + 1 - buf.len();
                buf.extend_from_slice(&part[..part.len().min(room)]);
            }
            let consumed = done.unwrap_or(chunk.len());
            self.reader.consume(consumed);
            if done.is_some() {
                break;
            }
        }
        if !seen_any {
            return Ok(None);
        }
        self.line += 1;
        if total > limits::MAX_EVENT_BYTES {
            return Ok(Some((self.line, Line::TooLong(total))));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            return Ok(Some((self.line, Line::Blank)));
        }
        Ok(Some((self.line, Line::Text(buf.as_slice()))))
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', b)
}

/// Opens the input; standard input is spooled to a temporary file so it can be read twice.
fn open_input(path: &PathBuf) -> anyhow::Result<File> {
    if path.as_os_str() == "-" {
        let mut spool = tempfile::tempfile()
            .context("cannot create a temporary file to hold standard input")?;
        io::copy(&mut io::stdin().lock(), &mut spool).context("cannot read standard input")?;
        spool.rewind()?;
        Ok(spool)
    } else {
        File::open(path).with_context(|| format!("cannot open {}", path.display()))
    }
}

/// Bytes of input validated per chunk; chunks are decoded in parallel.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Lines read for one parallel validation step.
#[derive(Default)]
struct Chunk {
    first_line: u64,
    bytes: Vec<u8>,
    /// Per line: its byte range in `bytes`, or the length of an overlong line, or blank.
    lines: Vec<ChunkLine>,
}

enum ChunkLine {
    Blank,
    Text(std::ops::Range<usize>),
    TooLong(usize),
}

/// Reads about [`CHUNK_BYTES`] of whole lines; `None` at the end of input.
fn read_chunk<R: BufRead>(
    lines: &mut BoundedLines<R>,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Chunk>> {
    let mut chunk = Chunk::default();
    while chunk.bytes.len() < CHUNK_BYTES {
        let Some((n, line)) = lines.next(buf)? else {
            break;
        };
        if chunk.lines.is_empty() {
            chunk.first_line = n;
        }
        chunk.lines.push(match line {
            Line::Blank => ChunkLine::Blank,
            Line::TooLong(len) => ChunkLine::TooLong(len),
            Line::Text(text) => {
                let start = chunk.bytes.len();
                chunk.bytes.extend_from_slice(text);
                ChunkLine::Text(start..chunk.bytes.len())
            }
        });
    }
    Ok((!chunk.lines.is_empty()).then_some(chunk))
}

/// Decodes every line of a chunk: `None` for blank lines.
fn decode_chunk(chunk: &Chunk) -> Vec<Option<Result<crate::event::Id, DecodeError>>> {
    chunk
        .lines
        .iter()
        .map(|line| match line {
            ChunkLine::Blank => None,
            ChunkLine::TooLong(size) => Some(Err(DecodeError::TooLarge {
                size: *size,
                limit: limits::MAX_EVENT_BYTES,
            })),
            ChunkLine::Text(range) => {
                Some(DealEvent::decode(&chunk.bytes[range.clone()]).map(|e| e.deal_id))
            }
        })
        .collect()
}

/// Chunks read ahead of each validating thread.
const CHUNKS_AHEAD_PER_THREAD: usize = 2;

/// The first pass: validates every line and remembers each valid line's
/// deal id. A reader thread cuts the input into chunks of whole lines, up to
/// 8 threads decode them (chunk `i` on thread `i % threads`), and this
/// thread takes the results back in input order: reading, decoding and
/// collecting overlap. At most `threads * (CHUNKS_AHEAD_PER_THREAD + 1)`
/// chunks of [`CHUNK_BYTES`] are in memory.
fn validate_file(file: &File) -> anyhow::Result<Validation> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let mut interned: HashMap<crate::event::Id, u32> = HashMap::new();
    let mut v = Validation {
        line_keys: Vec::new(),
        keys: Vec::new(),
        valid: 0,
        invalid_total: 0,
        invalid: Vec::new(),
    };
    type Decoded = (Chunk, Vec<Option<Result<crate::event::Id, DecodeError>>>);
    std::thread::scope(|scope| -> anyhow::Result<Validation> {
        let mut to_workers = Vec::with_capacity(threads);
        let mut from_workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (tx, rx) =
                std::sync::mpsc::sync_channel::<io::Result<Chunk>>(CHUNKS_AHEAD_PER_THREAD);
            let (dtx, drx) = std::sync::mpsc::sync_channel::<io::Result<Decoded>>(1);
            scope.spawn(move || {
                for chunk in rx {
                    let decoded = chunk.map(|chunk| {
                        let results = decode_chunk(&chunk);
                        (chunk, results)
                    });
                    if dtx.send(decoded).is_err() {
                        return;
                    }
                }
            });
            to_workers.push(tx);
            from_workers.push(drx);
        }
        scope.spawn(move || {
            let mut lines = BoundedLines::new(BufReader::with_capacity(1 << 20, file));
            let mut buf = Vec::with_capacity(4096);
            for worker in to_workers.iter().cycle() {
                let (chunk, last) = match read_chunk(&mut lines, &mut buf) {
                    Ok(Some(chunk)) => (Ok(chunk), false),
                    Ok(None) => return,
                    Err(e) => (Err(e), true),
                };
                // A closed channel: the collector stopped; nothing to do.
                if worker.send(chunk).is_err() || last {
                    return;
                }
            }
        });
        for worker in from_workers.iter().cycle() {
            let Ok(decoded) = worker.recv() else {
                // This worker's input ended: every chunk was read and collected.
                return Ok(v);
            };
            let (chunk, results) = decoded?;
            for (i, outcome) in results.into_iter().enumerate() {
                let n = chunk.first_line + i as u64;
                let key = match outcome {
                    None => None,
                    Some(Ok(deal_id)) => {
                        v.valid += 1;
                        let next =
                            u32::try_from(v.keys.len()).context("more than 2^32 distinct deals")?;
                        let k = *interned.entry(deal_id).or_insert_with_key(|id| {
                            v.keys.push(id.to_string());
                            next
                        });
                        Some(k)
                    }
                    Some(Err(err)) => {
                        v.invalid_total += 1;
                        if v.invalid.len() < MAX_REPORTED_LINES {
                            v.invalid.push(InvalidLine::new(n, &err));
                        }
                        None
                    }
                };
                debug_assert_eq!(
                    v.line_keys.len() as u64,
                    n - 1,
                    "lines are numbered without gaps"
                );
                v.line_keys.push(key);
            }
        }
        unreachable!("cycle over a non-empty list of workers never ends")
    })
}

fn print_invalid(v: &Validation) {
    let mut err = io::stderr().lock();
    for line in &v.invalid {
        let _ = writeln!(err, "line {}: {}", line.line, line.reason);
    }
    let unreported = v.invalid_total - v.invalid.len() as u64;
    if unreported > 0 {
        let _ = writeln!(err, "... and {unreported} more invalid lines");
    }
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `dealledger validate`.
pub fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let file = open_input(&args.input)?;
    let v = validate_file(&file)?;
    if args.json {
        print_json(&serde_json::json!({
            "valid": v.valid,
            "invalid": v.invalid_total,
            "errors": v.invalid,
        }))?;
    } else {
        print_invalid(&v);
        println!("{} valid, {} invalid", v.valid, v.invalid_total);
    }
    Ok(if v.invalid_total == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BAD_INPUT)
    })
}

/// `dealledger produce`.
pub fn produce(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    let mut file = open_input(&args.input)?;
    let validation = if args.no_validate {
        None
    } else {
        let v = validate_file(&file)?;
        if v.invalid_total > 0 && !args.skip_invalid {
            if args.json {
                print_json(&serde_json::json!({
                    "sent": 0,
                    "invalid": v.invalid_total,
                    "errors": v.invalid,
                }))?;
            } else {
                print_invalid(&v);
                eprintln!(
                    "{} of {} events invalid; nothing was sent (use --skip-invalid to send the valid ones)",
                    v.invalid_total,
                    v.invalid_total + v.valid
                );
            }
            return Ok(ExitCode::from(EXIT_BAD_INPUT));
        }
        file.rewind()?;
        Some(v)
    };

    let producer = BulkProducer::new(&args.kafka.settings(), &args.kafka.topic)?;
    let mut lines = BoundedLines::new(BufReader::with_capacity(1 << 20, &file));
    let mut buf = Vec::with_capacity(4096);
    let mut refused = Vec::new();
    while let Some((n, line)) = lines
        .next(&mut buf)
        .context("reading the input again for sending failed; some events may have been sent")?
    {
        let bytes = match line {
            Line::Text(b) => b,
            Line::Blank | Line::TooLong(_) => continue,
        };
        let subject;
        let key = match &validation {
            Some(v) => match v.line_keys[(n - 1) as usize] {
                Some(k) => Some(v.keys[k as usize].as_str()),
                None => continue,
            },
            None => {
                subject = subject_of(bytes);
                subject.as_deref()
            }
        };
        if let Err(e) = producer.send(n, key, bytes) {
            refused.push((n, e));
        }
    }
    let topic = producer.topic().to_string();
    let mut report = producer
        .finish(Duration::from_secs(300))
        .context("waiting for Kafka to acknowledge the events")?;
    report.failed.extend(refused);
    report.failed.sort_by_key(|(line, _)| *line);

    let per_partition: BTreeMap<String, u64> = report
        .per_partition
        .iter()
        .map(|(p, n)| (p.to_string(), *n))
        .collect();
    let skipped = validation.as_ref().map_or(0, |v| v.invalid_total);
    if args.json {
        let failed: Vec<_> = report
            .failed
            .iter()
            .map(|(line, e)| serde_json::json!({"line": line, "reason": e.to_string()}))
            .collect();
        print_json(&serde_json::json!({
            "topic": topic,
            "sent": report.delivered(),
            "partitions": per_partition,
            "failed": failed,
            "invalid": skipped,
            "errors": validation.as_ref().map(|v| &v.invalid),
        }))?;
    } else {
        if let Some(v) = &validation {
            print_invalid(v);
        }
        for (line, e) in &report.failed {
            eprintln!("line {line}: {e}");
        }
        let parts: Vec<String> = report
            .per_partition
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        println!(
            "sent {} events to topic {} (by partition: {})",
            report.delivered(),
            topic,
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            }
        );
        if skipped > 0 {
            println!("skipped {skipped} invalid lines");
        }
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{} events were not delivered", report.failed.len());
        ExitCode::FAILURE
    })
}

/// The `subject` of a JSON object line, if it has a string one (for `--no-validate`).
fn subject_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Subject {
        subject: Option<String>,
    }
    serde_json::from_slice::<Subject>(bytes).ok()?.subject
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<(u64, String)> {
        let mut r = BoundedLines::new(BufReader::with_capacity(7, input));
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some((n, l)) = r.next(&mut buf).unwrap() {
            out.push((
                n,
                match l {
                    Line::Blank => "<blank>".to_string(),
                    Line::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    Line::TooLong(n) => format!("<too long {n}>"),
                },
            ));
        }
        out
    }

    #[test]
    fn splits_lines_across_small_buffers() {
        let got = lines(b"abc\r\n\n  \nlonger line here\nlast");
        let want = vec![
            (1, "abc".to_string()),
            (2, "<blank>".to_string()),
            (3, "<blank>".to_string()),
            (4, "longer line here".to_string()),
            (5, "last".to_string()),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn overlong_lines_are_measured_not_buffered() {
        let mut input = vec![b'x'; limits::MAX_EVENT_BYTES + 10];
        input.extend_from_slice(b"\nok\n");
        let got = lines(&input);
        assert_eq!(
            got[0],
            (1, format!("<too long {}>", limits::MAX_EVENT_BYTES + 10))
        );
        assert_eq!(got[1], (2, "ok".to_string()));
    }
}
