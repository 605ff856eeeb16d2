//! The interface between the MapReduce machinery and the user's computation, and the registry of apps a
//! job can name.
//!
//! Workers receive a job as data (an app name plus `key=value` arguments), so every app is compiled into
//! `mrd` and looked up by name; arbitrary programs plug in through the [`streaming`](super::apps::streaming)
//! app instead of being loaded dynamically.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use crate::mr::apps;

/// Why an app could not be built or could not process its input.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No app of that name is registered.
    #[error("unknown app `{0}` (see `mrd apps`)")]
    Unknown(String),
    /// An argument without `=`.
    #[error("app argument `{0}` is not of the form key=value")]
    MalformedArg(String),
    /// A required argument is absent.
    #[error("app `{app}` needs the argument `{arg}`")]
    MissingArg {
        /// The app.
        app: String,
        /// The argument it needs.
        arg: String,
    },
    /// An argument the app does not know (likely a typo).
    #[error("app `{app}` does not take the argument `{arg}`")]
    UnexpectedArg {
        /// The app.
        app: String,
        /// The argument given.
        arg: String,
    },
    /// An argument with an unusable value.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArg {
        /// The argument.
        arg: String,
        /// Why its value is unusable.
        reason: String,
    },
    /// Reading or writing failed while the app ran.
    #[error("app I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// A restricted app the coordinator was not started to accept.
    #[error(
        "app `{0}` is refused by this coordinator: it runs commands on, crashes or writes outside the \
         job's directories on the workers; the operator must start the coordinator with \
         --allow-apps {0} to accept it"
    )]
    NotAllowed(String),
    /// The computation itself failed (e.g. a streaming command exited non-zero).
    #[error("{0}")]
    Failed(String),
}

pub use crate::mr::counts::Counts;

/// Receives the pairs a map call produces; takes borrowed strings so a combining runner only allocates
/// for keys it has not seen yet.
pub type Emit<'a> = dyn FnMut(&str, &str) + 'a;

/// A MapReduce computation.
///
/// ```
/// use ds824::mr::app::{App, AppError, Emit};
///
/// /// Counts identical lines.
/// struct Lines;
///
/// impl App for Lines {
///     fn map(&self, _file: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
///         for line in contents.lines() {
///             emit(line, "1");
///         }
///         Ok(())
///     }
///
///     fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
///         Ok(values.len().to_string())
///     }
/// }
///
/// use ds824::mr::merge::{MergeOptions, Run};
/// use ds824::mr::records;
///
/// // One map output: its pairs, sorted by key as every map output is.
/// let mut pairs = Vec::new();
/// for key in ["b", "a", "b"] {
///     records::encode(&mut pairs, key, "1");
/// }
/// let run = Run::memory(records::sorted(pairs, "map 0").unwrap(), "map 0");
/// let mut out = Vec::new();
/// ds824::mr::exec::run_reduce(&Lines, vec![run], &MergeOptions::in_memory(), &mut out).unwrap();
/// assert_eq!(String::from_utf8(out).unwrap(), "a 1\nb 2\n");
/// ```
///
/// Implementations must be deterministic functions of their input for re-executed and duplicated tasks to
/// produce the same output (the paper's §3.3 semantics); the test apps that deliberately are not exist to
/// check the machinery copes.
pub trait App: Send + Sync {
    /// Turns one input file into intermediate pairs. `filename` is the input's absolute path.
    fn map(&self, filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError>;

    /// Folds every value of one key into that key's output value.
    fn reduce(&self, key: &str, values: &[String]) -> Result<String, AppError>;

    /// Whether [`App::combine`] may pre-aggregate map output; worth it when reduce is associative and
    /// commutative (word count), because it shrinks intermediate data by orders of magnitude.
    fn has_combiner(&self) -> bool {
        false
    }

    /// Whether an input file may be cut into several map tasks ([`JobSpec::splits`]
    /// (crate::mr::job::JobSpec::splits)), each seeing only the lines that start in its byte range.
    /// False (the default) for apps whose map needs a whole file: grep numbers lines from the file's
    /// start, and the 6.824 test apps count map calls per file.
    fn splittable(&self) -> bool {
        false
    }

    /// Whether [`App::map`] may be called several times per task, on consecutive chunks of whole lines
    /// (8 MiB each), which bounds a task's memory by the chunk rather than by its split. False (the
    /// default) gives each map call the task's whole split, as a streaming mapper process expects.
    fn map_in_chunks(&self) -> bool {
        false
    }

    /// Whether this app's map only counts: it emits `(key, n)` pairs whose values reduce sums, and
    /// [`App::map_counts`] adds them to a table directly. The runner then keeps one table per task
    /// instead of strings per pair, which is what lets word count run at disk speed.
    fn counts(&self) -> bool {
        false
    }

    /// [`App::map`] for counting apps: add each key's count in `contents` to `counts`. Its results
    /// become `(key, total)` pairs, as if `map` had emitted them and the combiner summed them.
    fn map_counts(
        &self,
        _filename: &str,
        _contents: &str,
        _counts: &mut Counts,
    ) -> Result<(), AppError> {
        Err(AppError::Failed("this app does not count".into()))
    }

    /// Map-side partial reduce (paper §4.3); its result must be a valid input value for `reduce`.
    fn combine(&self, key: &str, values: &[String]) -> Result<String, AppError> {
        self.reduce(key, values)
    }

    /// Produces a whole reduce partition's output from its key groups, in key order.
    ///
    /// The default writes one `key value` line per key (the 6.824 format); streaming apps override it to
    /// hand the partition to an external program.
    fn reduce_partition(
        &self,
        groups: &mut dyn Groups,
        out: &mut dyn Write,
    ) -> Result<(), AppError> {
        while let Some((key, values)) = groups.next_group() {
            let value = self.reduce(key, values)?;
            writeln!(out, "{key} {value}")?;
        }
        Ok(())
    }
}

/// A reduce partition's key groups in key order, one at a time. A lending iterator rather than an
/// `Iterator`: each group borrows the merge's buffers, so a partition streams through the app instead
/// of living in memory whole.
///
/// A reader uses one of the two methods, not both. [`Groups::next_group`] holds one key's values at a
/// time (what [`App::reduce`]'s signature needs; with a combiner that is at most one value per map);
/// [`Groups::next_record`] holds one record, so a reducer that streams (an external program reading
/// sorted lines, as in Hadoop Streaming) stays in bounded memory even when one key has every value.
pub trait Groups {
    /// The next key and all its values, or `None` at the end. (Also `None` when reading the map outputs
    /// failed; the runner then discards whatever the app wrote.)
    fn next_group(&mut self) -> Option<(&str, &[String])>;

    /// The next record (key, one value) in key order, values of a key in map order; `None` as above.
    fn next_record(&mut self) -> Option<(&str, &str)>;
}

/// Groups already in memory, for tests and examples.
pub struct MemoryGroups<'a> {
    groups: Vec<(&'a str, &'a [String])>,
    /// The group [`Groups::next_record`] is in, and the next value of it.
    at: (usize, usize),
}

impl<'a> MemoryGroups<'a> {
    /// `groups` must be in key order, as a merge would produce them.
    pub fn new(groups: Vec<(&'a str, &'a [String])>) -> Self {
        MemoryGroups { groups, at: (0, 0) }
    }
}

impl Groups for MemoryGroups<'_> {
    fn next_group(&mut self) -> Option<(&str, &[String])> {
        let group = self.groups.get(self.at.0).copied();
        self.at = (self.at.0 + 1, 0);
        group
    }

    fn next_record(&mut self) -> Option<(&str, &str)> {
        loop {
            let (key, values) = self.groups.get(self.at.0).copied()?;
            if let Some(value) = values.get(self.at.1) {
                self.at.1 += 1;
                return Some((key, value.as_str()));
            }
            self.at = (self.at.0 + 1, 0);
        }
    }
}

/// One entry of the registry, for `mrd apps` and for validating submissions.
pub struct AppInfo {
    /// What jobs name it by (`mrd submit --app`).
    pub name: &'static str,
    /// One line for `mrd apps`, including the arguments the app takes.
    pub summary: &'static str,
    /// True for the 6.824 test apps: they crash, sleep or leave marker files on purpose.
    pub for_testing: bool,
    /// True for apps a coordinator refuses unless its `--allow-apps` names them: they run arbitrary
    /// commands on the workers (streaming) or crash them, stall them and write outside the job's
    /// directories (the test apps), which no ordinary submitter should be able to do.
    pub restricted: bool,
}

/// Which apps a coordinator accepts: the unrestricted ones always, the restricted ones (see
/// [`AppInfo::restricted`]) only when the operator listed them with `--allow-apps`.
#[derive(Clone, Debug, Default)]
pub struct AppPolicy {
    allowed: std::collections::BTreeSet<String>,
}

impl AppPolicy {
    /// A policy accepting the restricted apps in `allowed` too; unknown names are refused, so a typo
    /// does not silently leave an app out.
    pub fn new(allowed: &[String]) -> Result<AppPolicy, AppError> {
        let mut names = std::collections::BTreeSet::new();
        for name in allowed.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            if !registry().iter().any(|info| info.name == name) {
                return Err(AppError::Unknown(name.to_string()));
            }
            names.insert(name.to_string());
        }
        Ok(AppPolicy { allowed: names })
    }

    /// Whether a job may use app `name` (unknown apps pass here; building them refuses them).
    pub fn check(&self, name: &str) -> Result<(), AppError> {
        let restricted = registry()
            .iter()
            .any(|info| info.name == name && info.restricted);
        if restricted && !self.allowed.contains(name) {
            return Err(AppError::NotAllowed(name.to_string()));
        }
        Ok(())
    }
}

/// Every app `mrd` knows, built-ins first.
pub fn registry() -> &'static [AppInfo] {
    apps::REGISTRY
}

/// Parses `key=value` job arguments; later duplicates win, like repeated command-line flags.
pub fn parse_args(args: &[String]) -> Result<BTreeMap<String, String>, AppError> {
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => Err(AppError::MalformedArg(arg.clone())),
        })
        .collect()
}

/// Instantiates the app `name` with its job arguments; this is also how a submission is validated.
pub fn build(name: &str, args: &[String]) -> Result<Arc<dyn App>, AppError> {
    let args = parse_args(args)?;
    apps::build(
        name,
        Args {
            app: name,
            map: args,
        },
    )
}

/// Job arguments being consumed by an app's constructor; anything left over is reported as unexpected, so
/// a typo in an argument name is refused at submit time instead of silently ignored.
pub struct Args<'a> {
    app: &'a str,
    map: BTreeMap<String, String>,
}

impl Args<'_> {
    /// Takes an optional argument.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }

    /// Takes a required argument.
    pub fn require(&mut self, key: &str) -> Result<String, AppError> {
        self.take(key).ok_or_else(|| AppError::MissingArg {
            app: self.app.to_string(),
            arg: key.to_string(),
        })
    }

    /// Takes an optional numeric argument.
    pub fn number(&mut self, key: &str, default: u64) -> Result<u64, AppError> {
        match self.take(key) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| AppError::InvalidArg {
                arg: format!("{key}={raw}"),
                reason: "expected a non-negative integer".into(),
            }),
        }
    }

    /// Fails if any argument was not taken.
    pub fn finish(self) -> Result<(), AppError> {
        match self.map.into_keys().next() {
            None => Ok(()),
            Some(arg) => Err(AppError::UnexpectedArg {
                app: self.app.to_string(),
                arg,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_apps_and_bad_args_are_refused() {
        assert!(matches!(build("nope", &[]), Err(AppError::Unknown(_))));
        assert!(matches!(
            build("wc", &["x".into()]),
            Err(AppError::MalformedArg(_))
        ));
        assert!(matches!(
            build("wc", &["x=1".into()]),
            Err(AppError::UnexpectedArg { .. })
        ));
        assert!(matches!(
            build("grep", &[]),
            Err(AppError::MissingArg { .. })
        ));
        assert!(build("grep", &["pattern=a+".into()]).is_ok());
    }

    #[test]
    fn restricted_apps_need_allowing_and_builtins_do_not() {
        let default = AppPolicy::default();
        for name in ["wc", "indexer", "grep"] {
            assert!(default.check(name).is_ok(), "{name}");
        }
        for name in ["streaming", "crash", "nocrash", "jobcount", "early_exit"] {
            let err = default.check(name).unwrap_err();
            assert!(err.to_string().contains("--allow-apps"), "{err}");
        }
        let policy = AppPolicy::new(&["streaming".into(), " crash".into()]).unwrap();
        assert!(policy.check("streaming").is_ok());
        assert!(policy.check("crash").is_ok());
        assert!(policy.check("nocrash").is_err());
        assert!(matches!(
            AppPolicy::new(&["stremaing".into()]),
            Err(AppError::Unknown(_))
        ));
    }

    #[test]
    fn every_test_app_is_restricted() {
        for info in registry().iter().filter(|info| info.for_testing) {
            assert!(info.restricted, "{}", info.name);
        }
    }

    #[test]
    fn every_registered_app_builds() {
        for info in registry() {
            let args: Vec<String> = match info.name {
                "grep" => vec!["pattern=x".into()],
                "streaming" => vec!["mapper=cat".into(), "reducer=cat".into()],
                _ => vec![],
            };
            assert!(build(info.name, &args).is_ok(), "{}", info.name);
        }
    }
}
