//! Stop strings over a stream of text deltas.
//!
//! OpenAI's `stop` ends generation at the first occurrence of any of up to four strings, and
//! neither the stop string nor anything after it is returned. Text arrives in deltas (one per
//! detokenized token, see [`crate::IncrementalDetokenizer`]), and a stop string may span several
//! of them, so [`StopMatcher`] holds back the end of the text while it could still be the start of
//! a stop string, and releases it as soon as it cannot.
//!
//! Invariants:
//! - Nothing that belongs to a stop string, or follows one, is ever emitted.
//! - Only the longest suffix of the unsent text that is a prefix of some stop string is held back,
//!   so output lags the model by less than the longest stop string; with no stop strings every
//!   delta passes straight through.
//! - The result does not depend on how the text is cut into deltas: the stop that wins is the one
//!   that completes first, as if text arrived one character at a time; of stops completing at the
//!   same character, the one starting earliest (the longest). The output is the text before it.
//! - Every emitted piece is a whole number of characters (the held-back suffix starts on a
//!   character boundary).

/// What [`StopMatcher::push`] releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that can be sent to the client now; may be empty.
    pub text: String,
    /// A stop string was found: generation should end, and `text` is the last text to send.
    pub stopped: bool,
}

/// Finds stop strings in streamed text. One matcher per completion.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// The stop strings, none empty.
    stops: Vec<String>,
    /// Received text not yet emitted: a possible start of a stop string.
    pending: String,
    /// Index in `stops` of the stop found, once one is.
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`. Empty strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|stop| !stop.is_empty()).collect(),
            pending: String::new(),
            matched: None,
        }
    }

    /// Takes the next delta of generated text and returns what may be emitted now.
    ///
    /// Once a stop has been found, further deltas are ignored and every call reports `stopped`.
    pub fn push(&mut self, delta: &str) -> StopOutput {
        if self.matched.is_some() {
            return StopOutput {
                text: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutput {
                text: delta.to_owned(),
                stopped: false,
            };
        }
        self.pending.push_str(delta);

        if let Some((index, start)) = self.first_complete() {
            self.matched = Some(index);
            self.pending.truncate(start);
            return StopOutput {
                text: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }

        let keep = self.held_suffix_len();
        let held = self.pending.split_off(self.pending.len() - keep);
        StopOutput {
            text: std::mem::replace(&mut self.pending, held),
            stopped: false,
        }
    }

    /// Generation ended without a stop string: returns the held-back text, which can no longer
    /// become a stop string. Returns nothing after a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string that ended generation, if one did (vLLM reports it as `stop_reason`).
    pub fn matched(&self) -> Option<&str> {
        self.matched
            .and_then(|index| self.stops.get(index))
            .map(String::as_str)
    }

    /// The stop occurrence in `pending` that ends first, ties going to the earliest start, as
    /// `(index in stops, byte offset of its start)`.
    ///
    /// `pending` held no complete stop before the latest delta, so every occurrence found here
    /// ends inside that delta and comparing ends reproduces character-at-a-time matching.
    fn first_complete(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter_map(|(index, stop)| {
                self.pending
                    .find(stop.as_str())
                    .map(|start| (index, start, start + stop.len()))
            })
            .min_by_key(|&(_, start, end)| (end, start))
            .map(|(index, start, _)| (index, start))
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop.
    ///
    /// A suffix that starts on a character boundary of `pending` and equals a prefix of a stop is
    /// whole characters, so the prefix ends on a boundary of the stop too.
    fn held_suffix_len(&self) -> usize {
        let pending = self.pending.as_bytes();
        let longest = self
            .stops
            .iter()
            .map(|stop| stop.len() - 1)
            .max()
            .unwrap_or(0)
            .min(pending.len());
        (1..=longest)
            .rev()
            .find(|&len| {
                let start = pending.len() - len;
                self.pending.is_char_boundary(start)
                    && self
                        .stops
                        .iter()
                        .any(|stop| stop.as_bytes().starts_with(&pending[start..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `deltas` then finishes; returns the concatenated output, whether it stopped, and the
    /// largest amount of text held back after any push (in bytes).
    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool, usize) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut fed = 0;
        let mut max_held = 0;
        let mut stopped = false;
        for delta in deltas {
            let step = matcher.push(delta);
            out.push_str(&step.text);
            fed += delta.len();
            if step.stopped {
                stopped = true;
            } else {
                max_held = max_held.max(fed - out.len());
            }
        }
        assert_eq!(matcher.is_stopped(), stopped);
        out.push_str(&matcher.finish());
        (out, stopped, max_held)
    }

    #[test]
    fn table() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            // No stops: passthrough.
            (&[], &["Hello", " wor", "ld"], "Hello world", false),
            // Stop inside one delta: cut there, nothing after it.
            (&["\n\n"], &["one\n\ntwo"], "one", true),
            // Stop spanning three deltas.
            (&["<|end|>"], &["Hi <|", "en", "d|> trailing"], "Hi ", true),
            // False start: "<|en" then "d of text" is not "<|end|>".
            (
                &["<|end|>"],
                &["a <|en", "d of text"],
                "a <|end of text",
                false,
            ),
            // Stop at the very beginning.
            (&["STOP"], &["ST", "OP now"], "", true),
            // Stop text at the end with no more deltas: still cut.
            (&["###"], &["x#", "#", "#"], "x", true),
            // Held text flushed by finish when generation ends mid-prefix.
            (&["###"], &["x##"], "x##", false),
            // Overlapping stops: "bc" completes before "abcd" and wins.
            (&["abcd", "bc"], &["xab", "cd"], "xa", true),
            (&["abcd", "bc"], &["xabcd"], "xa", true),
            // Same end: the earlier start (longer stop) wins.
            (&["cd", "abcd"], &["xa", "bcd"], "x", true),
            // Two stops, the earlier occurrence wins regardless of list order.
            (&["END", "!"], &["wow! then END"], "wow", true),
            // Unicode: multi-byte stop split across deltas, and multi-byte text around it.
            (&["→停"], &["héllo →", "停 rest"], "héllo ", true),
            (&["→停"], &["日本→", "語"], "日本→語", false),
            (&["é"], &["caf", "é au lait"], "caf", true),
            // Empty stop strings are ignored.
            (&[""], &["abc"], "abc", false),
            // Deltas after a stop are dropped.
            (&["x"], &["ax", "more", "text"], "a", true),
        ];
        for &(stops, deltas, expected, stopped) in cases {
            let (out, did_stop, _) = run(stops, deltas);
            assert_eq!(
                (out.as_str(), did_stop),
                (expected, stopped),
                "stops {stops:?}, deltas {deltas:?}"
            );
        }
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut matcher = StopMatcher::new(vec!["<|end|>".into()]);
        assert_eq!(matcher.push("abc").text, "abc");
        // "<|" could start the stop: held.
        assert_eq!(matcher.push("de<|").text, "de");
        // "<|x" cannot: released in full.
        assert_eq!(matcher.push("x").text, "<|x");
        // "<|e" then "<" : the "<" is held, "<|e" released since "<|e<" is not a prefix.
        assert_eq!(matcher.push("<|e").text, "");
        assert_eq!(matcher.push("<").text, "<|e");
        assert_eq!(matcher.finish(), "<");
        assert_eq!(matcher.finish(), "");
        assert_eq!(matcher.matched(), None);
    }

    #[test]
    fn no_stops_hold_nothing() {
        let (out, stopped, held) = run(&[], &["a", "<|end|>", "é"]);
        assert_eq!((out.as_str(), stopped, held), ("a<|end|>é", false, 0));
    }

    #[test]
    fn reports_the_matched_stop_and_stays_stopped() {
        let mut matcher = StopMatcher::new(vec!["foo".into(), "bar".into()]);
        let step = matcher.push("say ba");
        assert_eq!((step.text.as_str(), step.stopped), ("say ", false));
        let step = matcher.push("r and foo");
        assert_eq!((step.text.as_str(), step.stopped), ("", true));
        assert_eq!(matcher.matched(), Some("bar"));
        assert_eq!(
            matcher.push("more"),
            StopOutput {
                text: String::new(),
                stopped: true
            }
        );
        assert_eq!(matcher.finish(), "");
    }

    /// Small deterministic generator so the loop needs no extra dependency.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Reference: scan one character at a time, stop at the first position where a stop ends.
    fn cut_at_first_stop(text: &str, stops: &[&str]) -> (String, bool) {
        for (end, ch) in text.char_indices() {
            let end = end + ch.len_utf8();
            let seen = &text[..end];
            let hit = stops
                .iter()
                .filter(|stop| !stop.is_empty() && seen.ends_with(**stop))
                .map(|stop| end - stop.len())
                .min();
            if let Some(start) = hit {
                return (text[..start].to_owned(), true);
            }
        }
        (text.to_owned(), false)
    }

    #[test]
    fn output_is_independent_of_how_text_is_split() {
        let text = "The answer<|e is 42 → 四十二 <|eot|> and\n\nUser: never shown <|end|>";
        let stop_sets: &[&[&str]] = &[
            &["<|end|>"],
            &["<|end|>", "<|eot|>"],
            &["\n\nUser:", "四十"],
            &["十二 <", "二 <|e"],
            &["absent", "<|e is"],
            &["zzz"],
            &[],
        ];
        let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for stops in stop_sets {
            let expected = cut_at_first_stop(text, stops);
            let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
            for _ in 0..300 {
                // Random cut points on character boundaries, from none to many.
                let cuts = rng.below(12);
                let mut at: Vec<usize> = (0..cuts)
                    .map(|_| boundaries[rng.below(boundaries.len())])
                    .collect();
                at.sort_unstable();
                at.dedup();
                let mut deltas = Vec::new();
                let mut from = 0;
                for cut in at.into_iter().chain([text.len()]) {
                    deltas.push(&text[from..cut]);
                    from = cut;
                }
                let (out, stopped, held) = run(stops, &deltas);
                assert_eq!(
                    (out, stopped),
                    expected,
                    "stops {stops:?}, deltas {deltas:?}"
                );
                assert!(
                    held < longest.max(1),
                    "held {held} bytes with stops {stops:?}, deltas {deltas:?}"
                );
            }
        }
    }
}
