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
        summary: "6.824 crash test: exits or sleeps at random (crash_permille=330, sleep_permille=330, max_sleep_ms=10000)",
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

/// Calls `f` with every word of `text`, exactly as [`words`] yields them, a byte at a time: ASCII
/// through a lookup table, and only non-ASCII characters decoded. Several times faster than
/// [`words`], which decodes every character; word count spends its time here.
pub fn for_each_word<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    let bytes = text.as_bytes();
    let (mut i, mut start) = (0, None);
    while i < bytes.len() {
        let byte = bytes[i];
        let (letter, width) = if byte < 0x80 {
            (ASCII_LETTER[byte as usize], 1)
        } else {
            // `i` is a character boundary: every earlier step advanced by a whole character.
            match text[i..].chars().next() {
                Some(c) => (c.is_alphabetic(), c.len_utf8()),
                None => break,
            }
        };
        match (letter, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                f(&text[s..i]);
                start = None;
            }
            _ => {}
        }
        i += width;
    }
    if let Some(s) = start {
        f(&text[s..]);
    }
}

/// Which ASCII bytes are letters (what `char::is_alphabetic` says of them).
static ASCII_LETTER: [bool; 128] = {
    let mut table = [false; 128];
    let mut b = 0;
    while b < 128 {
        table[b] = (b as u8).is_ascii_alphabetic();
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
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
        for text in samples {
            let mut fast = Vec::new();
            super::for_each_word(text, |w| fast.push(w));
            let slow: Vec<&str> = super::words(text).collect();
            assert_eq!(fast, slow, "{text:?}");
        }
    }
}
