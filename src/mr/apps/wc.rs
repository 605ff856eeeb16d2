//! Word count, the paper's running example.

use crate::mr::app::{App, AppError, Counts, Emit};

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
    fn map(&self, filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        let mut counts = Counts::default();
        self.map_counts(filename, contents, &mut counts)?;
        for (word, count) in counts.into_pairs() {
            emit(&word, &count.to_string());
        }
        Ok(())
    }

    fn counts(&self) -> bool {
        true
    }

    fn splittable(&self) -> bool {
        true
    }

    fn map_in_chunks(&self) -> bool {
        true
    }

    fn map_counts(
        &self,
        _filename: &str,
        contents: &str,
        counts: &mut Counts,
    ) -> Result<(), AppError> {
        super::word_spans(contents, |start, end| {
            counts.add_within(contents, start, end, 1)
        });
        Ok(())
    }

    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
        sum(values)
    }

    fn has_combiner(&self) -> bool {
        true
    }
}
