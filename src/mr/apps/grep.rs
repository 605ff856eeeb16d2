//! Distributed grep (paper §2.3).

use regex::Regex;

use crate::mr::app::{App, AppError, Args, Emit};

/// Emits every line matching `pattern=REGEX`, keyed `file:line-number` (zero-padded so key order is file
/// then line order).
pub struct Grep {
    pattern: Regex,
}

impl Grep {
    /// Compiles the pattern once per task rather than once per line.
    pub fn new(args: &mut Args<'_>) -> Result<Self, AppError> {
        let raw = args.require("pattern")?;
        let pattern = Regex::new(&raw).map_err(|err| AppError::InvalidArg {
            arg: format!("pattern={raw}"),
            reason: err.to_string(),
        })?;
        Ok(Self { pattern })
    }
}

impl App for Grep {
    fn map(&self, filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        for (number, line) in contents.lines().enumerate() {
            if self.pattern.is_match(line) {
                emit(&format!("{filename}:{:010}", number + 1), line);
            }
        }
        Ok(())
    }

    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
        Ok(values.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use crate::mr::app;

    #[test]
    fn matching_lines_are_keyed_by_file_and_line() {
        let grep = app::build("grep", &["pattern=^b".into()]).unwrap();
        let mut found = Vec::new();
        grep.map(
            "/f",
            "apple\nbanana\ncherry\nblueberry",
            &mut |k: &str, v: &str| found.push(format!("{k} {v}")),
        )
        .unwrap();
        assert_eq!(found, ["/f:0000000002 banana", "/f:0000000004 blueberry"]);
    }
}
