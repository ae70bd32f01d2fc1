//! The crate's error type for everything past building a vocabulary or compiling a template.
//!
//! [`VocabError`] and [`TemplateError`] name the metadata key or template line at fault; this
//! enum wraps them and adds the failures of the kit itself (tokenizer calls, the JSON form served
//! at `GET /v1/tokenizer`). Invariant: every variant says which operation, field or token failed,
//! and keeps its cause as `source`.

use std::path::PathBuf;

use crate::template::TemplateError;
use crate::vocab::VocabError;

/// Why building, loading or using a [`crate::PromptKit`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The vocabulary could not be read or built.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// The chat template could not be compiled or rendered.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A default sampling value is out of range.
    #[error(transparent)]
    SamplingDefaults(#[from] crate::kit::SamplingDefaultsError),
    /// A `tokenizers` call failed.
    #[error("tokenizer {op} failed: {source}")]
    Tokenizer {
        /// `encode`, `decode`, `serialise`, `parse`.
        op: &'static str,
        /// The cause.
        #[source]
        source: tokenizers::Error,
    },
    /// The JSON form of a kit is malformed.
    #[error("prompt kit JSON: `{field}` is invalid: {source}")]
    Json {
        /// The top-level field, or `(document)` for the whole body.
        field: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A model file (`tokenizer.json`, `tokenizer_config.json`) is missing, unreadable or
    /// malformed, or names a token or template the kit rejects.
    #[error("{}: {problem}", path.display())]
    File {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The cause, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A message (or a tool, or a tool call) holds a control token's text, and the model's
    /// template transforms it so that it cannot be told apart from the template's own (see
    /// `crate::rendered`): refused rather than guessed.
    #[error(
        "a message or tool contains `{token}`, this model's control token, and its chat template rewrites it so it cannot be kept as plain text; remove it from the request"
    )]
    ControlTextInContent {
        /// The token's text.
        token: String,
        /// Only the extra variables (a request's tools) hold control-token text, no message.
        in_extra: bool,
    },
    /// A text has more tokens than its caller can use; encoding stopped there.
    #[error("the text has at least {at_least} tokens, more than the {limit} allowed")]
    TooManyTokens {
        /// Ids made when encoding stopped.
        at_least: usize,
        limit: usize,
    },
    /// A long text has a run longer than a piece may be, without any break its tokenizer splits
    /// at ([`crate::MAX_PIECE_BYTES`]).
    #[error(
        "the text has a run of over {bytes} bytes without a space, digit or punctuation break; it is not tokenized"
    )]
    UnbrokenText { bytes: usize },
    /// The special tokens' texts could not be made into a matcher.
    #[error("the special tokens cannot be searched for: {0}")]
    ControlTexts(String),
    /// A chat request reached a model without a chat template.
    #[error("the model has no chat template; use the completions API with a raw prompt")]
    NoChatTemplate,
    /// A special token named by the kit is not in the vocabulary.
    #[error("`{field}` = `{token}` is not a token of the vocabulary")]
    UnknownToken {
        /// `bos_token` or `eos_token`.
        field: &'static str,
        /// The token text.
        token: String,
    },
    /// A stop token id is outside the vocabulary.
    #[error("stop token id {id} is outside the vocabulary of {vocab_size} tokens")]
    StopIdOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size, added tokens included.
        vocab_size: usize,
    },
}

impl PromptError {
    /// A [`PromptError::TooManyTokens`] of a part encoded after `before` ids, as the whole's
    /// (`limit` being the whole's); other errors as they are.
    pub(crate) fn after(self, before: usize, limit: usize) -> Self {
        match self {
            PromptError::TooManyTokens { at_least, .. } => PromptError::TooManyTokens {
                at_least: before + at_least,
                limit,
            },
            other => other,
        }
    }
}
