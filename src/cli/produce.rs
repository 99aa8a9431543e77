//! `dealledger produce` and `dealledger validate`: JSONL deal events in,
//! validated, then (for produce) published to Kafka.
//!
//! Input is read twice, streaming, so memory does not grow with the file:
//! the first pass validates every line and remembers each valid line's deal
//! id (interned); the second pass sends the lines' bytes exactly as written.
//! Standard input is first spooled to an anonymous temporary file.
//!
//! What is sent is what was validated: the second pass reads no further than
//! the first did (lines appended meanwhile are left alone), and each chunk
//! must have the length, lines and CRC-32 it had when it was validated. A
//! file changed in between stops the sending at the first chunk that
//! differs, with an error naming its first line ([`InputChanged`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
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
    /// Bytes of input read: the second pass reads no further.
    bytes_read: u64,
}

/// What a chunk held when it was validated: the second pass sends a chunk
/// only if it still holds the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkSum {
    first_line: u64,
    lines: usize,
    bytes: usize,
    /// CRC-32 of the chunk's bytes (overlong lines, never buffered, count by
    /// their length in `lines` of the chunk only).
    crc: u32,
}

impl ChunkSum {
    fn of(chunk: &Chunk) -> ChunkSum {
        ChunkSum {
            first_line: chunk.first_line,
            lines: chunk.lines.len(),
            bytes: chunk.bytes.len(),
            crc: crc32fast::hash(&chunk.bytes),
        }
    }
}

/// The input file changed between validation and sending.
#[derive(Debug, thiserror::Error)]
#[error(
    "the input changed after it was validated: from line {line} on it is not what was validated; nothing from there on was sent (produce reads its input twice: leave the file alone until it is done, or pipe it in with `-`)"
)]
pub struct InputChanged {
    /// First line of the first chunk that differs.
    pub line: u64,
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

/// Bytes of input per chunk (at least; a chunk ends at a line end): the
/// unit of reading, of parallel validation and of sending.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Whole lines of the input, read straight into a buffer that is reused
/// from chunk to chunk.
#[derive(Default)]
struct Chunk {
    /// Number of the chunk's first line (1-based).
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

impl Chunk {
    /// The line at `range` of `bytes` (without its `\n`): blank when it is
    /// all white space, overlong past [`limits::MAX_EVENT_BYTES`] (counting a
    /// final `\r`), else its text without a final `\r`.
    fn push_line(&mut self, range: std::ops::Range<usize>) {
        let line = &self.bytes[range.clone()];
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

    /// The text lines with their numbers.
    fn texts(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.lines
            .iter()
            .enumerate()
            .filter_map(|(i, line)| match line {
                ChunkLine::Text(range) => {
                    Some((self.first_line + i as u64, &self.bytes[range.clone()]))
                }
                ChunkLine::Blank | ChunkLine::TooLong(_) => None,
            })
    }
}

/// Cuts JSONL into [`Chunk`]s of whole lines: the bytes go from the reader
/// straight into the chunk's buffer (one copy, no allocation per line once
/// the buffers have grown). A line longer than [`limits::MAX_EVENT_BYTES`]
/// is measured and skipped, never buffered whole.
struct ChunkReader<R> {
    reader: R,
    /// Bytes read into a chunk before it is closed at the next line end.
    chunk_bytes: usize,
    /// Lines handed out so far.
    lines: u64,
    /// The start of the line the previous chunk stopped in.
    carry: Vec<u8>,
    eof: bool,
    /// Bytes read from `reader` so far.
    read: u64,
}

impl<R: Read> ChunkReader<R> {
    fn new(reader: R, chunk_bytes: usize) -> Self {
        assert!(chunk_bytes > 0, "chunks hold at least one byte");
        ChunkReader {
            reader,
            chunk_bytes,
            lines: 0,
            carry: Vec::new(),
            eof: false,
            read: 0,
        }
    }

    /// Appends up to `want` bytes to `buf`; sets `eof` when the input ends.
    fn read_into(&mut self, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
        let n = (&mut self.reader).take(want as u64).read_to_end(buf)?;
        self.read += n as u64;
        if n < want {
            self.eof = true;
        }
        Ok(())
    }

    /// Reads on past the rest of an overlong line: returns how many bytes it
    /// had until its `\n` (or the end of input) and appends what follows
    /// the `\n` to `buf`.
    fn skip_rest_of_line(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let mut skipped = 0;
        let mut scratch = Vec::new();
        while !self.eof {
            scratch.clear();
            self.read_into(&mut scratch, self.chunk_bytes)?;
            if let Some(i) = memchr::memchr(b'\n', &scratch) {
                buf.extend_from_slice(&scratch[i + 1..]);
                return Ok(skipped + i);
            }
            skipped += scratch.len();
        }
        Ok(skipped)
    }

    /// Refills `chunk` (its buffers reused) with the next lines, about
    /// `chunk_bytes` of them; false once the input is used up.
    fn next_chunk(&mut self, chunk: &mut Chunk) -> io::Result<bool> {
        chunk.bytes.clear();
        chunk.lines.clear();
        chunk.first_line = self.lines + 1;
        chunk.bytes.append(&mut self.carry);
        // Bytes of `chunk.bytes` already cut into lines.
        let mut cut = 0;
        loop {
            while let Some(i) = memchr::memchr(b'\n', &chunk.bytes[cut..]) {
                chunk.push_line(cut..cut + i);
                cut += i + 1;
            }
            let partial = chunk.bytes.len() - cut;
            if partial > limits::MAX_EVENT_BYTES {
                chunk.bytes.truncate(cut);
                let rest = self.skip_rest_of_line(&mut chunk.bytes)?;
                chunk.lines.push(ChunkLine::TooLong(partial + rest));
                continue;
            }
            if self.eof {
                if partial > 0 {
                    chunk.push_line(cut..chunk.bytes.len());
                }
                break;
            }
            if chunk.bytes.len() >= self.chunk_bytes && !chunk.lines.is_empty() {
                self.carry.extend_from_slice(&chunk.bytes[cut..]);
                chunk.bytes.truncate(cut);
                break;
            }
            let want = self.chunk_bytes.saturating_sub(chunk.bytes.len()).max(4096);
            self.read_into(&mut chunk.bytes, want)?;
        }
        self.lines += chunk.lines.len() as u64;
        Ok(!chunk.lines.is_empty())
    }
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
/// collecting overlap. At most `threads * (CHUNKS_AHEAD_PER_THREAD + 2) + 2`
/// chunks of [`CHUNK_BYTES`] are in memory: per thread, those waiting for it,
/// the one it decodes and the one waiting for the collector; the one being
/// read and the one being collected.
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
        chunks: Vec::new(),
        bytes_read: 0,
    };
    type Decoded = (
        Chunk,
        ChunkSum,
        Vec<Option<Result<crate::event::Id, DecodeError>>>,
    );
    let bytes_read = std::sync::atomic::AtomicU64::new(0);
    let bytes_read = &bytes_read;
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
                        let sum = ChunkSum::of(&chunk);
                        (chunk, sum, results)
                    });
                    if dtx.send(decoded).is_err() {
                        return;
                    }
                }
            });
            to_workers.push(tx);
            from_workers.push(drx);
        }
        // Chunks the collector is done with go back to the reader to be
        // filled again: their buffers have grown to size.
        let (free_tx, free_rx) =
            std::sync::mpsc::sync_channel::<Chunk>(threads * (CHUNKS_AHEAD_PER_THREAD + 1));
        scope.spawn(move || {
            let mut reader = ChunkReader::new(file, CHUNK_BYTES);
            for worker in to_workers.iter().cycle() {
                let mut chunk = free_rx.try_recv().unwrap_or_default();
                let (chunk, last) = match reader.next_chunk(&mut chunk) {
                    Ok(true) => (Ok(chunk), false),
                    Ok(false) => {
                        bytes_read.store(reader.read, std::sync::atomic::Ordering::Release);
                        return;
                    }
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
                v.bytes_read = bytes_read.load(std::sync::atomic::Ordering::Acquire);
                return Ok(v);
            };
            let (chunk, sum, results) = decoded?;
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
            // The reader may have stopped: then the chunk is simply dropped.
            let _ = free_tx.try_send(chunk);
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
    let file = open_input(&args.input)?;
    // Created first: librdkafka connects, fetches metadata and obtains its
    // idempotent producer id in the background while the input is
    // validated. Nothing is sent before validation is done.
    let producer = BulkProducer::new(&args.kafka.settings(), &args.kafka.topic)?;
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
        Some(v)
    };

    let mut refused = Vec::new();
    let changed = for_each_chunk_to_send(&file, validation.as_ref(), |chunk| {
        for (n, bytes) in chunk.texts() {
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
    .context("reading the input again for sending failed; some events may have been sent")?
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

/// The second pass: hands `send` each chunk of `file`, from its start. With
/// a `validation`, reads no further than it did and stops, with
/// [`InputChanged`], before the first chunk that is not what was validated
/// (or when the input ends early).
fn for_each_chunk_to_send(
    file: &File,
    validation: Option<&Validation>,
    mut send: impl FnMut(&Chunk),
) -> io::Result<Result<(), InputChanged>> {
    let mut file = file;
    file.rewind()?;
    let limit = validation.map_or(u64::MAX, |v| v.bytes_read);
    let mut reader = ChunkReader::new(file.take(limit), CHUNK_BYTES);
    let mut chunk = Chunk::default();
    let mut sums = validation.map(|v| v.chunks.iter());
    while reader.next_chunk(&mut chunk)? {
        if let Some(sums) = &mut sums
            && sums.next() != Some(&ChunkSum::of(&chunk))
        {
            return Ok(Err(InputChanged {
                line: chunk.first_line,
            }));
        }
        send(&chunk);
    }
    match sums.and_then(|mut sums| sums.next().copied()) {
        Some(missing) => Ok(Err(InputChanged {
            line: missing.first_line,
        })),
        None => Ok(Ok(())),
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

    /// Every line as `ChunkReader` cuts it, chunk by chunk of `chunk_bytes`.
    fn lines(input: &[u8], chunk_bytes: usize) -> Vec<(u64, String)> {
        let mut reader = ChunkReader::new(input, chunk_bytes);
        let mut chunk = Chunk::default();
        let mut out = Vec::new();
        while reader.next_chunk(&mut chunk).unwrap() {
            for (i, line) in chunk.lines.iter().enumerate() {
                out.push((
                    chunk.first_line + i as u64,
                    match line {
                        ChunkLine::Blank => "<blank>".to_string(),
                        ChunkLine::Text(r) => {
                            String::from_utf8_lossy(&chunk.bytes[r.clone()]).into_owned()
                        }
                        ChunkLine::TooLong(n) => format!("<too long {n}>"),
                    },
                ));
            }
        }
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
    fn second_pass(file: &File, v: &Validation) -> (Vec<u64>, Result<(), InputChanged>) {
        let mut sent = Vec::new();
        let verdict = for_each_chunk_to_send(file, Some(v), |chunk| {
            sent.extend(chunk.texts().map(|(n, _)| n));
        })
        .unwrap();
        (sent, verdict)
    }

    #[test]
    fn the_second_pass_sends_only_what_was_validated() {
        // 100,000 lines of 100 bytes: three chunks of CHUNK_BYTES (4 MiB).
        let lines = 100_000;
        let tmp = numbered_file(lines);
        tmp.as_file().rewind().unwrap();
        let v = validate_file(tmp.as_file()).unwrap();
        assert_eq!(v.invalid_total, lines);
        assert_eq!(v.chunks.len(), 3);
        assert_eq!(v.bytes_read, lines * 100);
        let third = v.chunks[2].first_line;

        // Unchanged: every line.
        let (sent, verdict) = second_pass(tmp.as_file(), &v);
        assert!(verdict.is_ok());
        assert_eq!(sent, (1..=lines).collect::<Vec<_>>());

        // Lines appended since are left alone.
        let mut appended = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path())
            .unwrap();
        appended.write_all(b"appended later\n").unwrap();
        let (sent, verdict) = second_pass(tmp.as_file(), &v);
        assert!(verdict.is_ok());
        assert_eq!(sent.len() as u64, lines);

        // One byte changed in the third chunk: the first two go, then it stops.
        let mut bytes = std::fs::read(tmp.path()).unwrap();
        let at = ((third + 10) * 100 - 50) as usize;
        bytes[at] = b'#';
        std::fs::write(tmp.path(), &bytes).unwrap();
        let file = File::open(tmp.path()).unwrap();
        let (sent, verdict) = second_pass(&file, &v);
        assert_eq!(verdict.unwrap_err().line, third);
        assert_eq!(sent, (1..third).collect::<Vec<_>>());

        // Cut short: what is there and unchanged goes, then it stops.
        let mut bytes = std::fs::read(tmp.path()).unwrap();
        bytes[at] = b' ';
        bytes.truncate((third - 1) as usize * 100);
        std::fs::write(tmp.path(), &bytes).unwrap();
        let file = File::open(tmp.path()).unwrap();
        let (sent, verdict) = second_pass(&file, &v);
        let err = verdict.unwrap_err();
        assert_eq!(err.line, third);
        assert!(
            err.to_string().contains(&format!("from line {third} on")),
            "{err}"
        );
        assert_eq!(sent, (1..third).collect::<Vec<_>>());
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
