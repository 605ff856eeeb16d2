//! An inverted index, 6.824's `indexer` app.

use std::collections::BTreeSet;

use crate::mr::app::{App, AppError, Emit};

/// Maps every word to the documents containing it, output as `count doc1,doc2,...` (sorted documents).
pub struct Indexer;

impl App for Indexer {
    fn map(&self, filename: &str, contents: &str, emit: &mut Emit<'_>) -> Result<(), AppError> {
        let unique: BTreeSet<&str> = super::words(contents).collect();
        for word in unique {
            emit(word, filename);
        }
        Ok(())
    }

    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, AppError> {
        let mut docs: Vec<&str> = values.iter().map(String::as_str).collect();
        docs.sort_unstable();
        // A document read as several splits or chunks names itself once per piece.
        docs.dedup();
        Ok(format!("{} {}", docs.len(), docs.join(",")))
    }

    fn splittable(&self) -> bool {
        true
    }

    fn map_in_chunks(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_listed_once_and_sorted() {
        let mut pairs = Vec::new();
        Indexer
            .map("/d2", "cat cat dog", &mut |k: &str, v: &str| {
                pairs.push((k.to_string(), v.to_string()))
            })
            .unwrap();
        assert_eq!(pairs.len(), 2);
        let docs = vec!["/d2".to_string(), "/d1".to_string(), "/d2".to_string()];
        assert_eq!(Indexer.reduce("cat", &docs).unwrap(), "2 /d1,/d2");
    }
}
