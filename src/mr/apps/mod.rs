//! The apps compiled into `mrd`: real ones (wc, indexer, grep, streaming) and the 6.824 test apps.

pub mod grep;
pub mod indexer;
pub mod streaming;
pub mod testing;
pub mod wc;

use std::sync::Arc;

use crate::mr::app::{App, AppError, AppInfo, Args};

pub(crate) static REGISTRY: &[AppInfo] = &[
    AppInfo {
        name: "wc",
        summary: "word count: `word count` per maximal run of letters (has a combiner)",
        for_testing: false,
        restricted: false,
    },
    AppInfo {
        name: "indexer",
        summary: "inverted index: `word N doc1,doc2,...` with the sorted documents containing the word",
        for_testing: false,
        restricted: false,
    },
    AppInfo {
        name: "grep",
        summary: "lines matching pattern=REGEX: `file:line-number text`, in file and line order",
        for_testing: false,
        restricted: false,
    },
    AppInfo {
        name: "streaming",
        summary: "any programs as mapper=CMD and reducer=CMD (run by sh), Hadoop Streaming style",
        for_testing: false,
        restricted: true,
    },
    AppInfo {
        name: "crash",
        summary: "6.824 crash test: exits or sleeps at random (crash_permille=330, sleep_permille=330, max_sleep_ms=10000, slow_reduce_ms=0)",
        for_testing: true,
        restricted: true,
    },
    AppInfo {
        name: "nocrash",
        summary: "6.824 reference output for `crash`",
        for_testing: true,
        restricted: true,
    },
    AppInfo {
        name: "early_exit",
        summary: "6.824 early-exit test: reduces of keys containing sherlock/tom take 3 s",
        for_testing: true,
        restricted: true,
    },
    AppInfo {
        name: "jobcount",
        summary: "6.824 job-count test: counts map executions through marker files in the working directory",
        for_testing: true,
        restricted: true,
    },
    AppInfo {
        name: "mtiming",
        summary: "6.824 map-parallelism test: marker files in the working directory measure overlap",
        for_testing: true,
        restricted: true,
    },
    AppInfo {
        name: "rtiming",
        summary: "6.824 reduce-parallelism test: marker files in the working directory measure overlap",
        for_testing: true,
        restricted: true,
    },
];

pub(crate) fn build(name: &str, mut args: Args<'_>) -> Result<Arc<dyn App>, AppError> {
    let app: Arc<dyn App> = match name {
        "wc" => Arc::new(wc::WordCount),
        "indexer" => Arc::new(indexer::Indexer),
        "grep" => Arc::new(grep::Grep::new(&mut args)?),
        "streaming" => Arc::new(streaming::Streaming::new(&mut args)?),
        "crash" => Arc::new(testing::Crash::new(&mut args, true)?),
        "nocrash" => Arc::new(testing::Crash::new(&mut args, false)?),
        "early_exit" => Arc::new(testing::EarlyExit),
        "jobcount" => Arc::new(testing::JobCount::new(&mut args)?),
        "mtiming" => Arc::new(testing::Timing { phase: "map" }),
        "rtiming" => Arc::new(testing::Timing { phase: "reduce" }),
        _ => return Err(AppError::Unknown(name.to_string())),
    };
    args.finish()?;
    Ok(app)
}

/// Splits text into maximal runs of letters, the word definition of 6.824's `wc` and `indexer`.
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphabetic())
        .filter(|word| !word.is_empty())
}

/// Calls `f` with every word of `text`, exactly as [`words`] yields them.
pub fn for_each_word<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    word_spans(text, |start, end| f(&text[start..end]));
}

/// Calls `f(start, end)` for every word `text[start..end]` of `text`, exactly as [`words`] yields
/// them. Word count spends its time here, so it works 64 bytes at a time: a bit mask of which bytes
/// are letters (ASCII by arithmetic the compiler vectorises, other characters decoded), then word
/// starts and ends as the mask's rising and falling edges, one loop turn per word rather than a
/// hard-to-predict branch per byte.
pub fn word_spans(text: &str, mut f: impl FnMut(usize, usize)) {
    let bytes = text.as_bytes();
    let (mut in_word, mut start) = (false, 0);
    // A multi-byte character running on into the next block: bytes left, and whether it is a letter.
    let (mut carried, mut carried_letter) = (0usize, false);
    for (index, block) in bytes.chunks(64).enumerate() {
        let base = index * 64;
        let mut mask: u64 = 0;
        if carried == 0 && block.len() == 64 && block.is_ascii() {
            for (j, eight) in block.chunks_exact(8).enumerate() {
                let word = u64::from_le_bytes(eight.try_into().unwrap_or([0; 8]));
                mask |= ascii_letters(word) << (8 * j);
            }
        } else {
            let mut j = 0;
            while j < block.len() {
                if carried == 0 {
                    let byte = block[j];
                    if byte < 0x80 {
                        mask |= u64::from((byte | 0x20).wrapping_sub(b'a') < 26) << j;
                        j += 1;
                        continue;
                    }
                    // `base + j` starts a character: every earlier step covered whole characters.
                    let c = text[base + j..].chars().next();
                    carried = c.map_or(1, char::len_utf8);
                    carried_letter = c.is_some_and(char::is_alphabetic);
                }
                mask |= u64::from(carried_letter) << j;
                carried -= 1;
                j += 1;
            }
        }
        let shifted = (mask << 1) | u64::from(in_word);
        let mut starts = mask & !shifted;
        // A falling edge past the block's end (a final short block) is the end of the text.
        let mut ends = !mask & shifted;
        loop {
            if in_word {
                if ends == 0 {
                    break;
                }
                f(start, base + ends.trailing_zeros() as usize);
                ends &= ends - 1;
                in_word = false;
            } else {
                if starts == 0 {
                    break;
                }
                start = base + starts.trailing_zeros() as usize;
                starts &= starts - 1;
                in_word = true;
            }
        }
    }
    if in_word {
        f(start, bytes.len());
    }
}

/// Which of 8 ASCII bytes (little-endian in `word`) are letters, as 8 bits, all at once: folded to
/// lower case, each byte is a letter if it is at least `a` and below `{` (neither sum carries into the
/// next byte, as every byte is below 0x80), and the 8 verdicts are gathered by one multiplication.
fn ascii_letters(word: u64) -> u64 {
    const EACH: u64 = 0x0101_0101_0101_0101;
    let lower = word | (0x20 * EACH);
    let at_least_a = lower + (0x80 - u64::from(b'a')) * EACH;
    let past_z = lower + (0x80 - u64::from(b'{')) * EACH;
    let high = at_least_a & !past_z & (0x80 * EACH);
    ((high >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

#[cfg(test)]
mod tests {
    #[test]
    fn ascii_letters_are_found_eight_at_a_time() {
        for start in 0u8..121 {
            let eight: Vec<u8> = (start..start + 8).collect();
            let word = u64::from_le_bytes(eight.clone().try_into().unwrap());
            let want = eight.iter().enumerate().fold(0u64, |m, (j, b)| {
                m | (u64::from(b.is_ascii_alphabetic()) << j)
            });
            assert_eq!(super::ascii_letters(word), want, "bytes from {start}");
        }
    }

    #[test]
    fn words_are_runs_of_letters() {
        let found: Vec<&str> = super::words("Hello, wörld!it's 42x").collect();
        assert_eq!(found, ["Hello", "wörld", "it", "s", "x"]);
    }

    #[test]
    fn the_fast_tokeniser_agrees_with_words() {
        let samples = [
            "",
            "a",
            "Hello, wörld!it's 42x",
            "ünïcödé ÄÖÜ ß 日本語テキスト, ελληνικά; 123 ٣٤ x\u{2028}y",
            "\u{1F600}emoji\u{1F600} trailing",
            "  leading and trailing  ",
        ];
        // Words and multi-byte characters across the 64-byte blocks, at every offset.
        let long: Vec<String> = (0..70)
            .map(|pad| format!("{}wörd日本 é{}x ab", " ".repeat(pad), "a".repeat(pad)))
            .collect();
        let samples = samples
            .iter()
            .copied()
            .chain(long.iter().map(String::as_str));
        for text in samples {
            let mut fast = Vec::new();
            super::for_each_word(text, |w| fast.push(w));
            let slow: Vec<&str> = super::words(text).collect();
            assert_eq!(fast, slow, "{text:?}");
        }
    }
}
