//! What every binary does the same way: structured logs, the runtime, clean shutdown on signals (the
//! daemons), and command output that a reader going away cannot break.
//!
//! Kept in the library so `kvd`, `mrd`, `kvctl` and `chaos` behave identically.

use std::fmt;
use tracing::span::Record;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};
use tracing_subscriber::EnvFilter;

/// The tokio runtime every binary runs on, with tokio's default of one worker thread per CPU. If it
/// cannot start (no threads, no file descriptors) the reason is printed as `PROGRAM: ...` and the caller
/// exits with the returned status 2, the one every binary gives for an environment it cannot work in.
pub fn runtime(program: &str) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    runtime_with(program, &RuntimeArgs::default())
}

/// [`runtime`] sized by the daemon's `--worker-threads`.
pub fn runtime_with(
    program: &str,
    args: &RuntimeArgs,
) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    raise_open_files_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.worker_threads {
        builder.worker_threads(usize::from(threads));
    }
    builder.build().map_err(|e| {
        crate::errln!("{program}: cannot start the async runtime: {e}");
        std::process::ExitCode::from(2)
    })
}

/// Raise this process's soft limit on open files towards its hard limit, up to
/// [`OPEN_FILES_WANTED`]. The soft limit is often 1,024 (for programs that use `select`, which nothing
/// here does), while a node holds a socket per client connection besides its Raft links and storage
/// files; the servers also bound the connections they hold by it ([`crate::security::Security::serve`]).
/// Capped rather than the whole hard limit (which some container runtimes set near 2^30): the
/// programs this one starts (`mrd`'s streaming commands) inherit it, and some of them walk every
/// descriptor up to it. Left as it is where it cannot be raised.
pub fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    // (An unlimited hard limit, `None`, is capped by the kernel's `nr_open` anyway.)
    let maximum = limit.maximum.unwrap_or(OPEN_FILES_WANTED);
    let wanted = OPEN_FILES_WANTED.min(maximum);
    if limit.current.is_some_and(|current| current >= wanted) {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        tracing::debug!(error = %e, "cannot raise the open-file limit");
    }
}

/// The open-file soft limit every binary asks for ([`raise_open_files_limit`]): room for both of a
/// node's listeners at their bound ([`crate::limits::MAX_CONNECTIONS_PER_LISTENER`]) many times over.
pub const OPEN_FILES_WANTED: u64 = 65_536;

/// The runtime flag every daemon takes.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Threads running the daemon's tasks (network, Raft, service); default one per CPU this process
    /// may use. Set it to the CPUs the process has to itself: when several nodes share a machine (a
    /// local cluster, containers without CPU limits), each waking its full set of threads for every
    /// message costs context switches without adding cores (three nodes on 2 cores with 1 each:
    /// about 25 % less CPU per put). A leader's disk flushes run on threads of their own, not counted
    /// here; with 1, a follower's short flushes run on that one, blocking it (fewer wake-ups per put).
    #[arg(long, env = "DS824_WORKER_THREADS", global = true,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// How log lines are written (`--log-format`, `DS824_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people: time, level, `span{node=.. term=.. role=..}`, message, fields.
    #[default]
    Text,
    /// One JSON object per line for log collectors: `timestamp`, `level`, `target`, the event's
    /// fields (`message` among them) at the top level, and the current span's fields under `span`
    /// (`node`, `term`, `role`), each with its latest value.
    Json,
}

/// The logging flag every daemon takes.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct LogArgs {
    /// How log lines look: text for people, json (one object per line) for log collectors. What is
    /// logged is set by RUST_LOG (default info; warn for mrd's workers and client commands).
    #[arg(
        long,
        value_enum,
        env = "DS824_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Log to stderr as text, filtered by `RUST_LOG` (default `info`). Spans carry the node id
/// (`raft{node=..}`, `kv{node=..}`) and role changes log the term and role, so interleaved logs of a
/// cluster stay readable.
pub fn init_logging() {
    init_logging_as("info", LogFormat::Text);
}

/// [`init_logging`] with another default filter for when `RUST_LOG` is unset (MapReduce workers log
/// less by default: they run many) and a [`LogFormat`].
pub fn init_logging_as(default: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ =
        tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi));
}

/// The subscriber of a [`LogFormat`], writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(
            builder
                .fmt_fields(LatestFields::default())
                .with_ansi(ansi)
                .finish(),
        ),
        // The JSON field formatter merges a recorded field into the span's object, so a span's
        // `term` and `role` are replaced there too, never appended.
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Span fields formatted as tracing-subscriber formats them, except that recording a field a span already
/// has replaces its value instead of appending another `name=value`. The nodes' spans live as long as the
/// process and record `term` and `role` at every change; appended, they made every log line of a node
/// that had seen a few hundred elections kilobytes long (`raft{node=2 term=0 role=pre-candidate term=1
/// role=candidate term=1 role=leader ...}`), and its memory grow with every one.
#[derive(Debug, Default)]
pub struct LatestFields(DefaultFields);

impl<'writer> FormatFields<'writer> for LatestFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        self.0.format_fields(writer, fields)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        self.0.format_fields(Writer::new(&mut added), fields)?;
        current.fields = merge_fields(&current.fields, &added);
        Ok(())
    }
}

/// `name=value` pairs of formatted fields. A value with spaces (a quoted string) continues its pair
/// until the next word that starts like a field name (`ident=`).
fn split_fields(formatted: &str) -> Vec<String> {
    let mut pairs: Vec<String> = Vec::new();
    for word in formatted.split(' ') {
        match pairs.last_mut() {
            Some(last) if field_name(word).is_none() => {
                last.push(' ');
                last.push_str(word);
            }
            _ if !word.is_empty() => pairs.push(word.to_string()),
            _ => {}
        }
    }
    pairs
}

/// The field name a `name=value` word starts with (ANSI styling removed), if it starts like one.
fn field_name(word: &str) -> Option<String> {
    let (name, _) = word.split_once('=')?;
    let mut plain = String::new();
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence: ESC [ ... final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let valid = !plain.is_empty()
        && plain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.');
    valid.then_some(plain)
}

/// `current` with each field of `added` replacing the one of the same name, new names appended.
fn merge_fields(current: &str, added: &str) -> String {
    let mut pairs = split_fields(current);
    for pair in split_fields(added) {
        let name = field_name(&pair);
        match pairs
            .iter_mut()
            .find(|old| name.is_some() && field_name(old) == name)
        {
            Some(old) => *old = pair,
            None => pairs.push(pair),
        }
    }
    pairs.join(" ")
}

/// Resolves on the first SIGTERM or SIGINT: what process supervisors and Ctrl-C send.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Set once stdout cannot take more: the rest of the output is dropped.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Why stdout failed, if it did for another reason than its reader going away.
static STDOUT_FAILURE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Writes a command's output (kvctl's, mrd's, chaos's) to stdout ([`outln!`](crate::outln),
/// [`out!`](crate::out)), where `print!` would panic with a backtrace when the write fails. Once a
/// write fails the rest of the output is dropped and the command carries on to its end, so a change
/// it is halfway through (`member add` then promotes) is finished, not cut short:
/// - the reader went away (`kvctl status | head -3`): quietly, and the command's own exit status
///   stands (a "no" stays 1);
/// - anything else (a full disk under `> FILE`): [`stdout_failure`] says why, and the binary reports
///   it once the command is done ([`exit_status`]).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = STDOUT_FAILURE.set(e.to_string());
        }
    }
}

/// Why writing the command's output failed, other than its reader going away (see [`write_stdout`]).
pub fn stdout_failure() -> Option<&'static str> {
    STDOUT_FAILURE.get().map(String::as_str)
}

/// The exit status of a command of `program` that ended with `code`. One that succeeded but whose
/// output (its answer) was lost, for another reason than its reader going away, did not succeed:
/// `failed` instead, and why on stderr. One that already failed keeps its status, which is its
/// verdict (a violation, a "no", undecided); why the output was lost is still said.
pub fn exit_status(program: &str, code: u8, failed: u8) -> u8 {
    match stdout_failure() {
        Some(e) => {
            write_stderr(format_args!(
                "{program}: error: cannot write the output: {e}\n"
            ));
            if code == 0 {
                failed
            } else {
                code
            }
        }
        None => code,
    }
}

/// `eprintln!` for a command's messages, which have nowhere to report its own failure: a closed or
/// broken stderr (`kvctl get k 2>&1 | head -0`) loses the line instead of panicking.
pub fn write_stderr(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `eprintln!` for a command's messages, through [`write_stderr`](crate::daemon::write_stderr).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::daemon::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `println!` for a command's output, through [`write_stdout`](crate::daemon::write_stdout).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::daemon::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's output, through [`write_stdout`](crate::daemon::write_stdout).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::daemon::write_stdout(format_args!($($arg)*))
    };
}

/// Log lines written into memory, for tests that check what was (or was not) logged: clones share
/// the buffer, so one can be the subscriber's writer and the other read afterwards.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl LogBuffer {
    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        let bytes = self.0.lock().expect("log buffer").clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }

    /// Starting a runtime raises the open-file soft limit to what is wanted, or the hard limit if
    /// that is lower. (Lowers this process's limit first: nextest runs each test in a process of
    /// its own.)
    #[test]
    fn a_runtime_starts_with_the_open_file_limit_raised() {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let before = getrlimit(Resource::Nofile);
        if let Some(maximum) = before.maximum.filter(|&m| m > 64) {
            // Lowered first, so the raise is seen (a soft limit may be lowered freely).
            let lowered = Rlimit {
                current: Some(64),
                maximum: Some(maximum),
            };
            setrlimit(Resource::Nofile, lowered).expect("lower the soft limit");
            let _runtime = super::runtime("test").expect("runtime");
            let wanted = super::OPEN_FILES_WANTED.min(maximum);
            assert_eq!(getrlimit(Resource::Nofile).current, Some(wanted));
        }
    }

    #[test]
    fn worker_threads_size_the_runtime_and_zero_is_refused() {
        let flags = Flags::try_parse_from(["kvd", "--worker-threads", "3"]).expect("parses");
        let runtime = runtime_with("kvd", &flags.runtime).expect("runtime");
        assert_eq!(runtime.metrics().num_workers(), 3);
        let default = Flags::try_parse_from(["kvd"]).expect("parses");
        assert_eq!(default.runtime.worker_threads, None);
        for bad in ["0", "1025", "-1", "many"] {
            assert!(
                Flags::try_parse_from(["kvd", "--worker-threads", bad]).is_err(),
                "--worker-threads {bad} was accepted"
            );
        }
    }

    #[test]
    fn a_recorded_field_replaces_its_value_and_others_are_kept() {
        assert_eq!(
            merge_fields("node=2 term=0 role=follower", "term=1 role=pre-candidate"),
            "node=2 term=1 role=pre-candidate"
        );
        assert_eq!(merge_fields("node=2", "term=3"), "node=2 term=3");
        assert_eq!(merge_fields("", "term=3"), "term=3");
        // A quoted value with spaces stays one field.
        assert_eq!(
            merge_fields(r#"node=1 note="a b c" term=1"#, "term=2"),
            r#"node=1 note="a b c" term=2"#
        );
        // Styled names (a terminal) still match.
        assert_eq!(
            merge_fields(
                "\u{1b}[3mterm\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 node=4",
                "term=2"
            ),
            "term=2 node=4"
        );
    }

    use super::LogBuffer as Buffer;

    /// What a node's span recorded `term` and `role` 1,000 times logs, in `format`.
    fn log_after_a_thousand_terms(format: LogFormat) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(
            format,
            EnvFilter::new("info"),
            move || writer.clone(),
            false,
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "raft",
                node = 7,
                term = tracing::field::Empty,
                role = tracing::field::Empty
            );
            for term in 0..1000u64 {
                span.record("term", term);
                span.record("role", "follower");
            }
            span.in_scope(|| tracing::info!(leader = 3, "hello"));
        });
        buffer.text()
    }

    #[test]
    fn json_lines_carry_the_spans_latest_fields_once() {
        let output = log_after_a_thousand_terms(LogFormat::Json);
        let line: serde_json::Value = serde_json::from_str(output.trim()).expect("one JSON line");
        assert_eq!(line["message"], "hello", "{output}");
        assert_eq!(line["leader"], 3, "{output}");
        assert_eq!(line["level"], "INFO", "{output}");
        assert_eq!(line["span"]["node"], 7, "{output}");
        assert_eq!(line["span"]["term"], 999, "{output}");
        assert_eq!(line["span"]["role"], "follower", "{output}");
        assert!(output.len() < 300, "{} bytes: {output}", output.len());
    }

    #[test]
    fn a_span_recorded_a_thousand_times_formats_one_value_per_field() {
        let output = log_after_a_thousand_terms(LogFormat::Text);
        assert!(
            output.contains(r#"raft{node=7 term=999 role="follower"}"#),
            "{output}"
        );
        assert_eq!(output.matches("term=").count(), 1, "{output}");
    }
}
