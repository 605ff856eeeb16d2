//! Word count, the paper's running example.

use std::collections::HashMap;

use crate::mr::app::{App, AppError, Emit};

/// Counts occurrences of every word. Map counts within its file before emitting (in-mapper combining:
/// one pair per distinct word instead of one per occurrence, which is what makes a 1 GiB corpus cheap), and
/// the combiner sums whatever still repeats, so the reduce input is tiny.
pub struct WordCount;

fn sum(values: &[String]) -> Result<String, AppError> {
    let mut total: u64 = 0;
    for value in values {
        let n: u64 = value
            .parse()
            .map_err(|_| AppError::Failed(format!("wc: `{value}` is not a count")))?;
        total += n;
    }
    Ok(total.to_string())
}

impl App for WordCount {
    fn map(&self, _filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for word in super::words(contents) {
            *counts.entry(word).or_insert(0) += 1;
        }
        for (word, count) in counts {
            emit(word, &count.to_string());
        }
        Ok(())
    }

    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
        sum(values)
    }

    fn has_combiner(&self) -> bool {
        true
    }
}
