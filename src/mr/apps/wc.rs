//! Word count, the paper's running example.

use crate::mr::app::{App, AppError, Emit};

/// Counts occurrences of every word; the combiner sums counts map-side, which is what makes a 1 GiB
/// corpus cheap to shuffle.
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
        for word in super::words(contents) {
            emit(word, "1");
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
