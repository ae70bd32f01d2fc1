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

use std::collections::HashMap;

use aho_corasick::automaton::{Automaton as _, StateID};
use aho_corasick::{Anchored, MatchKind};

/// What [`StopMatcher::push`] releases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that can be sent to the client now; may be empty.
    pub text: String,
    /// A stop string was found: generation should end, and `text` is the last text to send.
    pub stopped: bool,
}

/// Finds stop strings in streamed text. One matcher per completion.
///
/// An Aho-Corasick automaton (the `aho-corasick` crate's contiguous NFA) reads each delta's
/// bytes once: its state after a byte names the longest suffix of the text read so far that is a
/// prefix of some stop, so the text to hold back is that suffix's length, looked up, and a stop
/// completes when the state is a match state. Time is linear in the text (plus a copy of the
/// held-back text, at most the longest stop, per delta), whatever the stops: the naive scan this
/// replaced cost the delta times the longest stop, times the stops.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// `None` with no (non-empty) stop strings: every delta passes straight through.
    automaton: Option<Automaton>,
    /// Received text not yet emitted: the held-back suffix, a possible start of a stop string.
    pending: String,
    /// Index in the stops of the stop found, once one is.
    matched: Option<usize>,
}

#[derive(Debug, Clone)]
struct Automaton {
    stops: Vec<String>,
    nfa: aho_corasick::nfa::contiguous::NFA,
    state: StateID,
    /// Each state's depth: the length of the stop prefix it stands for.
    depth: HashMap<StateID, usize>,
}

impl Automaton {
    fn new(stops: Vec<String>) -> Option<Self> {
        let nfa = aho_corasick::nfa::contiguous::NFA::builder()
            .match_kind(MatchKind::Standard)
            .build(&stops)
            // Only a pattern set too large for the crate's identifiers fails; requests carry
            // at most four stops of at most 1 KiB (`tidelock_protocol::openai`).
            .ok()?;
        let start = nfa.start_state(Anchored::No).ok()?;
        let mut depth = HashMap::from([(start, 0)]);
        for stop in &stops {
            let mut state = start;
            for (i, &byte) in stop.as_bytes().iter().enumerate() {
                state = nfa.next_state(Anchored::No, state, byte);
                depth.insert(state, i + 1);
            }
        }
        Some(Automaton {
            stops,
            nfa,
            state: start,
            depth,
        })
    }

    /// Reads `bytes`; at the first stop completed, returns `(index in stops, its length, bytes
    /// read up to its end)`.
    fn read(&mut self, bytes: &[u8]) -> Option<(usize, usize, usize)> {
        for (i, &byte) in bytes.iter().enumerate() {
            self.state = self.nfa.next_state(Anchored::No, self.state, byte);
            if self.nfa.is_match(self.state) {
                // Every stop ending here: the longest starts earliest, and wins.
                let (index, len) = (0..self.nfa.match_len(self.state))
                    .map(|k| {
                        let id = self.nfa.match_pattern(self.state, k);
                        (id.as_usize(), self.nfa.pattern_len(id))
                    })
                    .max_by_key(|&(index, len)| (len, std::cmp::Reverse(index)))?;
                return Some((index, len, i + 1));
            }
        }
        None
    }

    /// The length of the longest suffix of the text read that is a proper prefix of a stop.
    fn held(&self) -> usize {
        self.depth.get(&self.state).copied().unwrap_or(0)
    }
}

impl StopMatcher {
    /// A matcher for `stops`. Empty strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|stop| !stop.is_empty()).collect();
        Self {
            automaton: (!stops.is_empty()).then(|| Automaton::new(stops)).flatten(),
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
        let Some(automaton) = &mut self.automaton else {
            return StopOutput {
                text: delta.to_owned(),
                stopped: false,
            };
        };
        let before = self.pending.len();
        self.pending.push_str(delta);
        if let Some((index, len, read)) = automaton.read(delta.as_bytes()) {
            self.matched = Some(index);
            // The stop ends `read` bytes into the delta and started `len` bytes earlier: in
            // the held-back text or the delta, never before (what was emitted could not start
            // a stop).
            self.pending.truncate(before + read - len);
            return StopOutput {
                text: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }
        // A suffix that equals a stop's prefix starts where the stop does, on a character
        // boundary, so the emitted text is whole characters.
        let emit = self.pending.len() - automaton.held();
        let text = self.pending[..emit].to_owned();
        self.pending.replace_range(..emit, "");
        StopOutput {
            text,
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
        let stops = &self.automaton.as_ref()?.stops;
        self.matched
            .and_then(|index| stops.get(index))
            .map(String::as_str)
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

    #[test]
    fn the_longest_allowed_stops_over_a_long_answer_cut_exactly() {
        // Four stops of 1 KiB that the text keeps almost completing: the naive scan's worst
        // case (4 x 1 KiB of comparisons per character, rescanned per delta).
        let long = |tail: char| format!("{}{tail}", "a".repeat(1023));
        let stops: Vec<String> = ['b', 'c', 'd', 'e'].into_iter().map(long).collect();
        let mut matcher = StopMatcher::new(stops);
        let mut out = String::new();
        for _ in 0..200_000 {
            let step = matcher.push("a");
            assert!(!step.stopped);
            out.push_str(&step.text);
        }
        // Everything but the last 1,023 bytes is out; they could still start a stop.
        assert_eq!(out.len(), 200_000 - 1023);
        let step = matcher.push("aad");
        assert!(step.stopped);
        out.push_str(&step.text);
        // The stop began 1,023 bytes before the "d": the 'a's before it (and the two new ones
        // that are not part of it) are all the answer.
        assert_eq!(out, "a".repeat(200_002 - 1023));
        assert_eq!(matcher.matched(), Some(long('d').as_str()));
    }
}
