//! Deterministic text corpora for the tests and the benchmark: Zipf-distributed words (like natural text,
//! a few words are very frequent and most are rare) with punctuation, digits and apostrophes mixed in so
//! the "maximal run of letters" word rule is exercised.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::mr::{fsutil, MrError};

/// The 6.824 input names, so tests that key on file names (early exit's sherlock/tom) behave the same.
pub const BOOKS: [&str; 8] = [
    "being_ernest",
    "dorian_gray",
    "frankenstein",
    "grimm",
    "huckleberry_finn",
    "metamorphosis",
    "sherlock_holmes",
    "tom_sawyer",
];

/// A vocabulary of `size` distinct pronounceable words, in rank order.
fn vocabulary(size: usize, rng: &mut ChaCha8Rng) -> Vec<String> {
    const ONSETS: [&str; 16] = [
        "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "th", "w", "st",
    ];
    const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ea"];
    let mut seen = std::collections::HashSet::new();
    let mut words = Vec::with_capacity(size);
    while words.len() < size {
        let syllables = rng.random_range(1..=3);
        let mut word = String::new();
        for _ in 0..syllables {
            word.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
            word.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
        }
        if rng.random_bool(0.1) {
            word = format!("{}{}", word[..1].to_uppercase(), &word[1..]);
        }
        if seen.insert(word.clone()) {
            words.push(word);
        }
    }
    words
}

/// Writes `files` files of about `bytes_per_file` bytes each into `dir` (named `pg-<book>.txt` for the
/// first eight, then `pg-<n>.txt`) and returns their paths. The same `seed` always gives the same bytes.
pub fn write_zipf_corpus(
    dir: &Path,
    files: usize,
    bytes_per_file: usize,
    seed: u64,
) -> Result<Vec<PathBuf>, MrError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let words = vocabulary(5000, &mut rng);
    let mut cumulative = Vec::with_capacity(words.len());
    let mut total = 0.0;
    for rank in 1..=words.len() {
        total += 1.0 / (rank as f64).powf(1.07);
        cumulative.push(total);
    }
    let mut paths = Vec::with_capacity(files);
    for file in 0..files {
        let name = match BOOKS.get(file) {
            Some(book) => format!("pg-{book}.txt"),
            None => format!("pg-{file}.txt"),
        };
        let path = dir.join(name);
        let mut text = String::with_capacity(bytes_per_file + 64);
        let mut in_line = 0;
        while text.len() < bytes_per_file {
            let pick = rng.random::<f64>() * total;
            let rank = cumulative
                .partition_point(|&c| c < pick)
                .min(words.len() - 1);
            text.push_str(&words[rank]);
            in_line += 1;
            match rng.random_range(0..100) {
                0..=5 => text.push_str(", "),
                6..=8 => text.push_str(". "),
                9 => text.push_str("'s "),
                10 => text.push_str(&format!(" {} ", rng.random_range(0..2000))),
                11 => text.push_str("--"),
                _ => text.push(' '),
            }
            if in_line >= 12 {
                text.push('\n');
                in_line = 0;
            }
        }
        text.push('\n');
        fsutil::write_atomic(&path, false, |w| {
            w.write_all(text.as_bytes()).map_err(MrError::io(&path))
        })?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    #[test]
    fn corpus_is_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let pa = super::write_zipf_corpus(a.path(), 2, 2000, 7).unwrap();
        let pb = super::write_zipf_corpus(b.path(), 2, 2000, 7).unwrap();
        assert_eq!(
            std::fs::read(&pa[1]).unwrap(),
            std::fs::read(&pb[1]).unwrap()
        );
        assert!(pa[0].ends_with("pg-being_ernest.txt"));
    }
}
