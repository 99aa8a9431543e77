//! `dealledger produce` and `dealledger validate`: JSONL deal events in,
//! validated, then (for produce) published to Kafka.
//!
//! Input is read twice, from a read-only memory map of the file (no copy
//! into buffers; pages are given back as each chunk is done), so memory
//! does not grow with the file: the first pass validates every line and
//! remembers each valid line's deal id (interned); the second pass sends the
//! lines' bytes exactly as written. Standard input is first spooled to an
//! anonymous temporary file.
//!
//! What is sent is what was validated: the map covers the file as it was
//! when produce opened it (lines appended meanwhile are left alone), and
//! each chunk must have the length, lines and CRC-32 it had when it was
//! validated. A file changed in place in between stops the sending at the
//! first chunk that differs, with an error naming its first line
//! ([`InputChanged`]). A file cut short while mapped would fault the read
//! (SIGBUS): produce then exits with an error saying so ([`SigbusGuard`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Seek, Write};
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
    /// What each chunk held when it was validated, in input order.
    chunks: Vec<ChunkSum>,
}

/// What a chunk held when it was validated: the second pass sends a chunk
/// only if it still holds the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkSum {
    first_line: u64,
    lines: usize,
    bytes: usize,
    /// CRC-32 of the chunk's bytes.
    crc: u32,
}

/// The input file changed between validation and sending.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the input changed after it was validated: from line {line} on it is not what was validated; nothing from there on was sent (produce reads its input twice: leave the file alone until it is done, or pipe it in with `-`)"
)]
pub struct InputChanged {
    /// First line of the first chunk that differs.
    pub line: u64,
}

/// Opens the input. Standard input, and any input that is not a regular
/// file (a pipe such as `<(...)`, a device), is first spooled to an anonymous
/// temporary file, so that it can be mapped and read twice.
fn open_input(path: &PathBuf) -> anyhow::Result<File> {
    let spool = |from: &mut dyn io::Read| -> anyhow::Result<File> {
        let mut spool =
            tempfile::tempfile().context("cannot create a temporary file to hold the input")?;
        io::copy(from, &mut spool).with_context(|| format!("cannot read {}", path.display()))?;
        spool.rewind()?;
        Ok(spool)
    };
    if path.as_os_str() == "-" {
        return spool(&mut io::stdin().lock());
    }
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let kind = file
        .metadata()
        .with_context(|| format!("cannot read the metadata of {}", path.display()))?
        .file_type();
    if kind.is_file() {
        Ok(file)
    } else {
        spool(&mut file)
    }
}

/// The input's bytes: a read-only map of the file as long as it was when
/// mapped.
struct Input {
    /// `None` for an empty file (nothing to map).
    map: Option<memmap2::Mmap>,
}

impl Input {
    /// Maps `file`. `guard` must live as long as the map is read.
    fn map(file: &File, _guard: &SigbusGuard) -> anyhow::Result<Input> {
        let len = file
            .metadata()
            .context("cannot read the input's size")?
            .len();
        if len == 0 {
            return Ok(Input { map: None });
        }
        // SAFETY: the map is read-only and only ever read as bytes. Another
        // process may still change the file under it: a change in place is
        // caught by the chunk checksums, and a file cut short faults the read
        // (SIGBUS), which `SigbusGuard` turns into an error exit.
        let map =
            unsafe { memmap2::Mmap::map(file) }.context("cannot map the input into memory")?;
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Input { map: Some(map) })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }

    /// Gives back the pages wholly inside `span` (read and done with), so
    /// that the map does not count towards memory as it is read through.
    fn release(&self, span: std::ops::Range<usize>) {
        let Some(map) = &self.map else { return };
        const PAGE: usize = 4096;
        let start = span.start.next_multiple_of(PAGE);
        let end = span.end / PAGE * PAGE;
        if start < end {
            // SAFETY: a read-only, file-backed shared map: pages dropped are
            // read again from the file if touched; nothing is lost.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Turns a SIGBUS (the mapped input was cut short while produce read it)
/// into an error message and exit status 1 instead of a crash, while it
/// lives.
struct SigbusGuard {
    previous: libc::sigaction,
}

/// The message [`SigbusGuard`]'s handler writes: set by the first guard a
/// process installs (a command installs one), before its handler is.
static SIGBUS_MESSAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

extern "C" fn on_sigbus(_: libc::c_int) {
    let message = SIGBUS_MESSAGE
        .get()
        .map_or(&b"error: bus error\n"[..], Vec::as_slice);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `message` is
    // initialised before the handler is installed and never changed.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(1);
    }
}

impl SigbusGuard {
    /// `doing`: what the command was doing with the input; `consequence`:
    /// what that means for the user.
    fn install(input: &std::path::Path, doing: &str, consequence: &str) -> SigbusGuard {
        let _ = SIGBUS_MESSAGE.set(
            format!(
                "error: {}: the input was cut short while {doing} it (bus error on its memory map); {consequence}\n",
                input.display()
            )
            .into_bytes(),
        );
        // SAFETY: installs a handler that only calls async-signal-safe
        // functions; the previous disposition is restored on drop.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, &action, &mut previous);
            SigbusGuard { previous }
        }
    }
}

impl Drop for SigbusGuard {
    fn drop(&mut self) {
        // SAFETY: puts back the disposition `install` replaced.
        unsafe {
            libc::sigaction(libc::SIGBUS, &self.previous, std::ptr::null_mut());
        }
    }
}

/// Bytes of input per chunk (at least; a chunk ends at a line end): the
/// unit of parallel validation, of checking and of sending.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Whole lines of the input: where they are in it.
#[derive(Default)]
struct Chunk {
    /// Number of the chunk's first line (1-based).
    first_line: u64,
    /// Its bytes in the input, `\n`s included.
    span: std::ops::Range<usize>,
    /// Per line: its byte range in the input, or the length of an overlong line, or blank.
    lines: Vec<ChunkLine>,
}

enum ChunkLine {
    Blank,
    Text(std::ops::Range<usize>),
    TooLong(usize),
}

impl Chunk {
    /// The line at `range` of `input` (without its `\n`): blank when it is
    /// all white space, overlong past [`limits::MAX_EVENT_BYTES`] (counting a
    /// final `\r`), else its text without a final `\r`.
    fn push_line(&mut self, input: &[u8], range: std::ops::Range<usize>) {
        let line = &input[range.clone()];
        self.lines.push(if line.len() > limits::MAX_EVENT_BYTES {
            ChunkLine::TooLong(line.len())
        } else if line.iter().all(u8::is_ascii_whitespace) {
            ChunkLine::Blank
        } else if line.last() == Some(&b'\r') {
            ChunkLine::Text(range.start..range.end - 1)
        } else {
            ChunkLine::Text(range)
        });
    }

    /// The text lines of `input` in this chunk, with their numbers.
    fn texts<'a>(&'a self, input: &'a [u8]) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        self.lines
            .iter()
            .enumerate()
            .filter_map(move |(i, line)| match line {
                ChunkLine::Text(range) => Some((self.first_line + i as u64, &input[range.clone()])),
                ChunkLine::Blank | ChunkLine::TooLong(_) => None,
            })
    }

    /// Makes this the chunk of the lines in `span` of `input`, the first
    /// numbered `first_line`: cuts them, reading each byte once, calls `each`
    /// with each line as it is cut, and returns what the chunk holds.
    fn cut(
        &mut self,
        span: std::ops::Range<usize>,
        first_line: u64,
        input: &[u8],
        mut each: impl FnMut(&ChunkLine),
    ) -> ChunkSum {
        self.lines.clear();
        self.first_line = first_line;
        self.span = span.clone();
        let mut crc = crc32fast::Hasher::new();
        for_each_line(input, span.clone(), |line| {
            crc.update(&input[line.start..(line.end + 1).min(span.end)]);
            self.push_line(input, line);
            each(self.lines.last().expect("just pushed"));
        });
        ChunkSum {
            first_line,
            lines: self.lines.len(),
            bytes: span.len(),
            crc: crc.finalize(),
        }
    }
}

/// The spans of the chunks of `input`, in order ([`chunk_end`]).
fn chunk_spans(
    input: &[u8],
    chunk_bytes: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        (at < input.len()).then(|| {
            let span = at..chunk_end(input, at, chunk_bytes);
            at = span.end;
            span
        })
    })
}

/// Where the chunk of lines that starts at `start` ends: after the line
/// that holds its `chunk_bytes`-th byte, or at the end of the input. Both
/// passes cut chunks with it, so they cut the same chunks.
fn chunk_end(input: &[u8], start: usize, chunk_bytes: usize) -> usize {
    assert!(chunk_bytes > 0, "chunks hold at least one byte");
    let last = start.saturating_add(chunk_bytes - 1);
    if last >= input.len() {
        return input.len();
    }
    memchr::memchr(b'\n', &input[last..]).map_or(input.len(), |i| last + i + 1)
}

/// Calls `line` with the range of every line in `span` of `input`, without
/// its `\n` (the last one may have none).
fn for_each_line(
    input: &[u8],
    span: std::ops::Range<usize>,
    mut line: impl FnMut(std::ops::Range<usize>),
) {
    let mut at = span.start;
    while at < span.end {
        let end = memchr::memchr(b'\n', &input[at..span.end]).map_or(span.end, |i| at + i);
        line(at..end);
        at = end + 1;
    }
}

/// Cuts the lines of `span` into `chunk` and decodes each as it is cut,
/// while its bytes are in the CPU's cache (each byte of the input is read
/// from memory once). Returns the outcome of each line (`None` for blank
/// ones) and what the chunk holds, its lines numbered from 1 (the caller
/// numbers them).
fn cut_and_decode(
    chunk: &mut Chunk,
    span: std::ops::Range<usize>,
    input: &[u8],
) -> (Vec<Option<Result<crate::event::Id, DecodeError>>>, ChunkSum) {
    let mut outcomes = Vec::new();
    let sum = chunk.cut(span, 1, input, |line| {
        outcomes.push(match line {
            ChunkLine::Blank => None,
            ChunkLine::TooLong(size) => Some(Err(DecodeError::TooLarge {
                size: *size,
                limit: limits::MAX_EVENT_BYTES,
            })),
            ChunkLine::Text(range) => {
                Some(DealEvent::decode(&input[range.clone()]).map(|e| e.deal_id))
            }
        })
    });
    (outcomes, sum)
}

/// Chunks read ahead of each validating thread.
const CHUNKS_AHEAD_PER_THREAD: usize = 2;

/// The first pass: validates every line and remembers each valid line's
/// deal id. The input is split into chunks at line ends ([`chunk_end`]),
/// up to 8 threads cut them into lines and decode them (chunk `i` on thread
/// `i % threads`, [`cut_and_decode`]), and this thread takes the results
/// back in input order, numbers the lines and gives back the pages of each
/// chunk it is done with. At most `threads * (CHUNKS_AHEAD_PER_THREAD + 2) +
/// 1` chunks are being worked on: per thread, those waiting for it, the one
/// it decodes and the one waiting for this thread; and the one collected.
fn validate_input(input: &Input) -> anyhow::Result<Validation> {
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
        chunks: Vec::new(),
    };
    type Decoded = (
        Chunk,
        ChunkSum,
        Vec<Option<Result<crate::event::Id, DecodeError>>>,
    );
    let bytes = input.bytes();
    std::thread::scope(|scope| -> anyhow::Result<Validation> {
        let mut to_workers = Vec::with_capacity(threads);
        let mut from_workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (tx, rx) =
                std::sync::mpsc::sync_channel::<std::ops::Range<usize>>(CHUNKS_AHEAD_PER_THREAD);
            let (dtx, drx) = std::sync::mpsc::sync_channel::<Decoded>(1);
            scope.spawn(move || {
                for span in rx {
                    let mut chunk = Chunk::default();
                    let (results, sum) = cut_and_decode(&mut chunk, span, bytes);
                    if dtx.send((chunk, sum, results)).is_err() {
                        return;
                    }
                }
            });
            to_workers.push(tx);
            from_workers.push(drx);
        }
        scope.spawn(move || {
            for (span, worker) in chunk_spans(bytes, CHUNK_BYTES).zip(to_workers.iter().cycle()) {
                // A closed channel: the collector stopped; nothing to do.
                if worker.send(span).is_err() {
                    return;
                }
            }
        });
        let mut next_line = 1;
        for worker in from_workers.iter().cycle() {
            let Ok((mut chunk, mut sum, results)) = worker.recv() else {
                // This worker's input ended: every chunk was cut and collected.
                return Ok(v);
            };
            chunk.first_line = next_line;
            sum.first_line = next_line;
            next_line += sum.lines as u64;
            v.chunks.push(sum);
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
            input.release(chunk.span);
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
    let guard = SigbusGuard::install(
        &args.input,
        "validate was reading",
        "it was not validated to its end",
    );
    let v = validate_input(&Input::map(&file, &guard)?)?;
    drop(guard);
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
    let file = open_input(&args.input)?;
    // Created first: librdkafka connects, fetches metadata and obtains its
    // idempotent producer id in the background while the input is
    // validated. Nothing is sent before validation is done.
    let producer = BulkProducer::new(&args.kafka.settings(), &args.kafka.topic)?;
    let guard = SigbusGuard::install(
        &args.input,
        "produce was reading",
        "events before that may have been sent",
    );
    let input = Input::map(&file, &guard)?;
    let validation = if args.no_validate {
        None
    } else {
        let v = validate_input(&input)?;
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
        Some(v)
    };

    let mut refused = Vec::new();
    let changed = for_each_chunk_to_send(&input, validation.as_ref(), |chunk| {
        for (n, bytes) in chunk.texts(input.bytes()) {
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
    })
    .err();
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
            "input_changed": changed.as_ref().map(|c| serde_json::json!({
                "line": c.line,
                "reason": c.to_string(),
            })),
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
    if let Some(changed) = &changed {
        eprintln!("error: {}: {changed}", args.input.display());
    }
    Ok(if report.failed.is_empty() && changed.is_none() {
        ExitCode::SUCCESS
    } else {
        if !report.failed.is_empty() {
            eprintln!("{} events were not delivered", report.failed.len());
        }
        ExitCode::FAILURE
    })
}

/// The second pass: hands `send` each chunk of `input`, then gives its
/// pages back. With a `validation`, stops with [`InputChanged`] before the
/// first chunk that is not what was validated (or when the input ends
/// early).
fn for_each_chunk_to_send(
    input: &Input,
    validation: Option<&Validation>,
    mut send: impl FnMut(&Chunk),
) -> Result<(), InputChanged> {
    let bytes = input.bytes();
    let mut chunk = Chunk::default();
    let mut sums = validation.map(|v| v.chunks.iter());
    let mut first_line = 1;
    for span in chunk_spans(bytes, CHUNK_BYTES) {
        let sum = chunk.cut(span, first_line, bytes, |_| {});
        if let Some(sums) = &mut sums
            && sums.next() != Some(&sum)
        {
            return Err(InputChanged { line: first_line });
        }
        send(&chunk);
        input.release(chunk.span.clone());
        first_line += sum.lines as u64;
    }
    match sums.and_then(|mut sums| sums.next().copied()) {
        Some(missing) => Err(InputChanged {
            line: missing.first_line,
        }),
        None => Ok(()),
    }
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

    /// Every line as the chunks of `chunk_bytes` cut it.
    fn lines(input: &[u8], chunk_bytes: usize) -> Vec<(u64, String)> {
        let mut chunk = Chunk::default();
        let mut out = Vec::new();
        let mut end = 0;
        let mut first_line = 1;
        for span in chunk_spans(input, chunk_bytes) {
            assert_eq!(span.start, end, "chunks follow each other");
            end = span.end;
            let sum = chunk.cut(span, first_line, input, |_| {});
            assert!(sum.lines > 0, "no chunk is empty");
            first_line += sum.lines as u64;
            for (i, line) in chunk.lines.iter().enumerate() {
                out.push((
                    chunk.first_line + i as u64,
                    match line {
                        ChunkLine::Blank => "<blank>".to_string(),
                        ChunkLine::Text(r) => {
                            String::from_utf8_lossy(&input[r.clone()]).into_owned()
                        }
                        ChunkLine::TooLong(n) => format!("<too long {n}>"),
                    },
                ));
            }
        }
        assert_eq!(end, input.len(), "the chunks cover the input");
        out
    }

    /// A file of `lines` numbered lines of 100 bytes (with the `\n`).
    fn numbered_file(lines: u64) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for n in 1..=lines {
            writeln!(file, "{:<99}", format!("line {n} is not an event")).unwrap();
        }
        file.flush().unwrap();
        file
    }

    /// The numbers of the lines the second pass hands out, and its verdict.
    fn second_pass(input: &Input, v: &Validation) -> (Vec<u64>, Result<(), InputChanged>) {
        let mut sent = Vec::new();
        let verdict = for_each_chunk_to_send(input, Some(v), |chunk| {
            sent.extend(chunk.texts(input.bytes()).map(|(n, _)| n));
        });
        (sent, verdict)
    }

    #[test]
    fn the_second_pass_sends_only_what_was_validated() {
        use std::os::unix::fs::FileExt;
        // 100,000 lines of 100 bytes: three chunks of CHUNK_BYTES (4 MiB).
        let lines = 100_000;
        let tmp = numbered_file(lines);
        let guard = SigbusGuard::install(tmp.path(), "a test was reading", "-");
        let input = Input::map(tmp.as_file(), &guard).unwrap();
        let v = validate_input(&input).unwrap();
        assert_eq!(v.invalid_total, lines);
        assert_eq!(v.chunks.len(), 3);
        let third = v.chunks[2].first_line;

        // Unchanged: every line.
        let (sent, verdict) = second_pass(&input, &v);
        assert!(verdict.is_ok());
        assert_eq!(sent, (1..=lines).collect::<Vec<_>>());

        // Lines appended since are left alone.
        let mut appended = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path())
            .unwrap();
        appended.write_all(b"appended later\n").unwrap();
        let (sent, verdict) = second_pass(&input, &v);
        assert!(verdict.is_ok());
        assert_eq!(sent.len() as u64, lines);

        // One byte changed in place in the third chunk: the first two go,
        // then it stops.
        let at = (third + 10) * 100 - 50;
        tmp.as_file().write_all_at(b"#", at).unwrap();
        let (sent, verdict) = second_pass(&input, &v);
        let err = verdict.unwrap_err();
        assert_eq!(err.line, third);
        assert!(
            err.to_string().contains(&format!("from line {third} on")),
            "{err}"
        );
        assert_eq!(sent, (1..third).collect::<Vec<_>>());
    }

    #[test]
    fn a_pipe_is_spooled_and_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("events.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", fifo.display());
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, b"one\ntwo\n\nthree").unwrap())
        };
        let file = open_input(&fifo).unwrap();
        writer.join().unwrap();
        let guard = SigbusGuard::install(&fifo, "a test was reading", "-");
        let input = Input::map(&file, &guard).unwrap();
        assert_eq!(input.bytes(), b"one\ntwo\n\nthree");
        let v = validate_input(&input).unwrap();
        assert_eq!((v.valid, v.invalid_total), (0, 3));
    }

    #[test]
    fn an_empty_input_has_no_lines() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let guard = SigbusGuard::install(tmp.path(), "a test was reading", "-");
        let input = Input::map(tmp.as_file(), &guard).unwrap();
        let v = validate_input(&input).unwrap();
        assert_eq!((v.valid, v.invalid_total, v.chunks.len()), (0, 0, 0));
        assert_eq!(second_pass(&input, &v), (vec![], Ok(())));
    }

    #[test]
    fn splits_lines_whatever_the_chunk_size() {
        let want = vec![
            (1, "abc".to_string()),
            (2, "<blank>".to_string()),
            (3, "<blank>".to_string()),
            (4, "longer line here".to_string()),
            (5, "last".to_string()),
        ];
        for chunk_bytes in [1, 2, 3, 7, 16, 1 << 20] {
            assert_eq!(
                lines(b"abc\r\n\n  \nlonger line here\nlast", chunk_bytes),
                want,
                "chunks of {chunk_bytes} bytes"
            );
        }
        assert_eq!(lines(b"one\n", 2), vec![(1, "one".to_string())]);
        assert_eq!(lines(b"", 2), Vec::<(u64, String)>::new());
        assert_eq!(lines(b"\n", 2), vec![(1, "<blank>".to_string())]);
    }

    #[test]
    fn overlong_lines_are_measured_not_buffered() {
        for chunk_bytes in [7, 4096, limits::MAX_EVENT_BYTES + 5, 1 << 20] {
            let mut input = b"first\n".to_vec();
            input.extend(vec![b'x'; limits::MAX_EVENT_BYTES + 10]);
            input.extend_from_slice(b"\nok\n");
            input.extend(vec![b'y'; 3 * limits::MAX_EVENT_BYTES]);
            let got = lines(&input, chunk_bytes);
            let want = vec![
                (1, "first".to_string()),
                (2, format!("<too long {}>", limits::MAX_EVENT_BYTES + 10)),
                (3, "ok".to_string()),
                (4, format!("<too long {}>", 3 * limits::MAX_EVENT_BYTES)),
            ];
            assert_eq!(got, want, "chunks of {chunk_bytes} bytes");
        }
        // Exactly at the limit is fine; a `\r` beyond it is not.
        let at_limit = vec![b'z'; limits::MAX_EVENT_BYTES];
        let mut input = at_limit.clone();
        input.extend_from_slice(b"\n");
        input.extend_from_slice(&at_limit);
        input.extend_from_slice(b"\r\n");
        let got = lines(&input, 1 << 20);
        assert_eq!(got[0].1.len(), limits::MAX_EVENT_BYTES);
        assert_eq!(
            got[1].1,
            format!("<too long {}>", limits::MAX_EVENT_BYTES + 1)
        );
    }
}
