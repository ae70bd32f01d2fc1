//! Keeping control tokens out of what users write. A chat template writes role markers such as
//! `<|im_start|>system` as text, and the tokenizer turns that text into control ids; so a message
//! whose content contains the same text would become real role markers, and a user could forge a
//! system turn inside their own message. Hugging Face's `split_special_tokens` exists for this.
//!
//! Here, only the template may produce control ids: a [`RenderedChat`] knows which byte ranges
//! of its text came from message contents, and [`crate::PromptKit::encode_rendered`] tokenizes
//! those ranges with special-token text as plain text. A conversation whose contents contain no
//! control-token text at all (nearly all of them) is tokenized exactly as before, in one piece.
//!
//! How the ranges are found: the conversation is rendered twice, once as it is and once with
//! each content wrapped in two private-use characters (leading and trailing whitespace outside
//! them, so a template's `| trim` still applies). Removing the markers from the second rendering
//! must give the first exactly; their positions are then the contents' ranges. A template that
//! transforms contents in other ways (so the two disagree) makes a content with control-token
//! text an error that names the token, rather than a guess.

use std::ops::Range;

/// Marks the start and the end of a content in a rendering (Unicode private use; removed from
/// contents before rendering, so only the markers placed here are ever seen).
pub(crate) const START: char = '\u{E000}';
pub(crate) const END: char = '\u{E001}';

/// A conversation rendered by its template, with the byte ranges its message contents occupy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    text: String,
    user: Vec<Range<usize>>,
}

impl RenderedChat {
    /// Text written by the template alone (or trusted as such): no user ranges.
    pub fn template_only(text: String) -> Self {
        Self {
            text,
            user: Vec::new(),
        }
    }

    pub(crate) fn with_ranges(text: String, user: Vec<Range<usize>>) -> Self {
        Self { text, user }
    }

    /// Text a user wrote, all of it (a completion prompt).
    pub fn user_only(text: String) -> Self {
        let mut user = Vec::new();
        if !text.is_empty() {
            user.push(0..text.len());
        }
        Self { text, user }
    }

    /// The rendered text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The pieces of `text[from..]`, in order: `(piece, written by a user)`. Empty pieces are
    /// left out.
    pub fn pieces(&self, from: usize) -> Vec<(&str, bool)> {
        self.pieces_between(from, self.text.len())
    }

    /// The pieces of `text[from..to]` ([`RenderedChat::pieces`] of the text as if it ended at
    /// `to`).
    pub fn pieces_between(&self, from: usize, to: usize) -> Vec<(&str, bool)> {
        let mut out = Vec::new();
        let mut at = from;
        for r in &self.user {
            if r.end <= at {
                continue;
            }
            if r.start >= to || at >= to {
                break;
            }
            let start = r.start.max(at);
            if start > at {
                out.push((&self.text[at..start], false));
            }
            let end = r.end.min(to);
            if end > start {
                out.push((&self.text[start..end], true));
            }
            at = end;
        }
        if at < to {
            out.push((&self.text[at..to], false));
        }
        out
    }
}

/// A content with the markers removed (what both renderings use).
pub(crate) fn unmarked(content: &str) -> String {
    content
        .chars()
        .filter(|&c| c != START && c != END)
        .collect()
}

/// A content wrapped in the markers, its surrounding whitespace left outside them.
pub(crate) fn marked(content: &str) -> String {
    let core = content.trim();
    if core.is_empty() {
        return content.to_owned();
    }
    let lead = &content[..content.len() - content.trim_start().len()];
    let trail = &content[content.trim_end().len()..];
    format!("{lead}{START}{core}{END}{trail}")
}

/// The marked rendering without its markers, and the ranges they enclosed; `None` when the
/// markers do not pair up.
pub(crate) fn strip(rendering: &str) -> Option<(String, Vec<Range<usize>>)> {
    let mut text = String::with_capacity(rendering.len());
    let mut ranges = Vec::new();
    let mut open = None;
    for c in rendering.chars() {
        match c {
            START if open.is_none() => open = Some(text.len()),
            END => ranges.push(open.take()?..text.len()),
            START => return None,
            c => text.push(c),
        }
    }
    open.is_none().then_some((text, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_go_inside_the_whitespace() {
        assert_eq!(marked("  hi there\n"), format!("  {START}hi there{END}\n"));
        assert_eq!(marked("   "), "   ");
        assert_eq!(unmarked(&format!("a{START}b{END}c")), "abc");
    }

    #[test]
    fn stripping_finds_the_ranges_and_refuses_unpaired_markers() {
        let rendering = format!("<s>{START}one{END} and {START}two{END}</s>");
        let (text, ranges) = strip(&rendering).unwrap();
        assert_eq!(text, "<s>one and two</s>");
        assert_eq!(
            ranges.iter().map(|r| &text[r.clone()]).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(strip(&format!("{START}a")), None);
        assert_eq!(strip(&format!("a{END}")), None);
        assert_eq!(strip(&format!("{START}{START}a{END}")), None);
    }

    #[test]
    fn pieces_split_at_user_ranges_from_any_offset() {
        let chat =
            RenderedChat::with_ranges("<u>hello</u><a>".into(), std::iter::once(3..8).collect());
        assert_eq!(
            chat.pieces(0),
            [("<u>", false), ("hello", true), ("</u><a>", false)]
        );
        assert_eq!(chat.pieces(5), [("llo", true), ("</u><a>", false)]);
        assert_eq!(chat.pieces(9), [("/u><a>", false)]);
        assert_eq!(chat.pieces_between(0, 5), [("<u>", false), ("he", true)]);
        assert_eq!(chat.pieces_between(5, 9), [("llo", true), ("<", false)]);
        assert!(chat.pieces_between(4, 4).is_empty());
        assert_eq!(RenderedChat::user_only("x".into()).pieces(0), [("x", true)]);
        assert!(RenderedChat::user_only(String::new()).pieces(0).is_empty());
    }
}
