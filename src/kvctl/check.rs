//! `kvctl check`: judge a JSON-lines history with the linearizability checker, and say why.

use super::{EXIT_NO, EXIT_OK, EXIT_UNKNOWN};
use crate::check::{check_report, CheckOptions, CheckResult, History, HistoryError, KvModel};
use std::io::BufReader;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// Why the history could not be checked at all.
#[derive(Debug, Error)]
pub enum CheckFileError {
    /// The file cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid history.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Which line is wrong and why.
        source: HistoryError,
    },
}

/// Default `--max-memory`: the whole check (the parsed history included) stays under it.
pub const DEFAULT_MAX_MEMORY: usize = 2 << 30;

/// Check the history in `path` within `budget` and the default memory limit; returns the report to
/// print and the exit code ([`EXIT_OK`], [`EXIT_NO`] with the offending sub-history, or
/// [`EXIT_UNKNOWN`]).
pub fn check_file(path: &Path, budget: Duration) -> Result<(String, u8), CheckFileError> {
    check_file_with(path, budget, DEFAULT_MAX_MEMORY)
}

/// Check the history in `path` within `budget` and `max_memory` bytes in total: the parsed history
/// and every search. A history that alone does not fit, or keys whose search does not, end as
/// [`EXIT_UNKNOWN`] with the keys named and why — never as a process killed for memory.
pub fn check_file_with(
    path: &Path,
    budget: Duration,
    max_memory: usize,
) -> Result<(String, u8), CheckFileError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| CheckFileError::Open {
        path: shown.clone(),
        source,
    })?;
    let history = match History::from_jsonl_bounded(BufReader::new(file), max_memory) {
        Ok(history) => history,
        Err(HistoryError::TooLarge { line, limit }) => {
            let report = format!(
                "unknown: {shown}: the history alone needs more than --max-memory ({}) by line {line}",
                human_bytes(limit)
            );
            return Ok((report, EXIT_UNKNOWN));
        }
        Err(source) => {
            return Err(CheckFileError::Parse {
                path: shown,
                source,
            })
        }
    };
    let options = CheckOptions {
        budget,
        threads: 0,
        max_memo_bytes: max_memory.saturating_sub(history.approx_bytes()),
    };
    let report = check_report(&history, &KvModel, &options);
    let code = match &report.result {
        CheckResult::Ok => EXIT_OK,
        CheckResult::Violation(_) => EXIT_NO,
        CheckResult::Unknown { .. } => EXIT_UNKNOWN,
    };
    let mut text = match &report.result {
        CheckResult::Ok => format!("ok: {} operations, linearizable", history.len()),
        other => other.to_string(),
    };
    if let CheckResult::Unknown { .. } = report.result {
        text.push_str("\nundecided keys:");
        for p in report.partitions.iter() {
            if let Some(why) = p.undecided {
                text.push_str(&format!(
                    "\n  {:?}: {why} after {:.1?} ({} ops, {} indeterminate, {} held)",
                    p.key,
                    p.elapsed,
                    p.ops,
                    p.info_ops,
                    human_bytes(p.peak_bytes)
                ));
            }
        }
        let decided = report
            .partitions
            .iter()
            .filter(|p| p.undecided.is_none())
            .count();
        text.push_str(&format!(
            "\n{decided} of {} keys decided linearizable; peak search memory {} of {}",
            report.partitions.len(),
            human_bytes(report.peak_bytes),
            human_bytes(options.max_memo_bytes)
        ));
    }
    Ok((text, code))
}

/// Parses a memory size for `--max-memory`: a number of bytes, optionally with a unit `K`, `M`,
/// `G`, `T` (powers of 1024, also written `KiB`, `MiB`, ... or `KB`, `MB`, ...; case-insensitive)
/// — e.g. `512MiB`, `2GiB`, `1g`, `65536`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{text:?}: unknown unit (use e.g. 512MiB or 2GiB)")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a size (use e.g. 512MiB or 2GiB)"))?;
    let bytes = value * 2f64.powi(shift);
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(format!("{text:?}: out of range"));
    }
    Ok(bytes as usize)
}

/// `bytes` in the largest binary unit that keeps it readable.
fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1.5 KiB"), Ok(1536));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("-1GiB").is_err());
    }
}
