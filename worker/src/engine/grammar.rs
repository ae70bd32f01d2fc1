//! Constrained decoding (structured outputs): a request's [`Constraint`] becomes an `llguidance`
//! matcher that, before each token, says which tokens may come next; the sampler draws only
//! among those (see `sampling`), and the matcher follows every token chosen.
//!
//! `llguidance` is the grammar engine llama.cpp, vLLM and SGLang use: JSON schemas compile to a
//! grammar lazily, and a mask over the whole vocabulary costs tens of microseconds for most
//! steps. Its token trie is built once per worker from the model's `tokenizer.json` (each
//! token's bytes, by `llguidance`'s own reading of the file), with the model's stop ids as the
//! end tokens a finished grammar allows; text it needs tokenized goes through the worker's own
//! tokenizer.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tidelock_prompt::PromptKit;
use tidelock_protocol::Constraint;
use toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// Why a worker cannot constrain its output, or a request's constraint cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The tokenizer cannot be turned into a token trie.
    #[error("cannot build the token trie for constrained decoding: {0}")]
    Tokenizer(String),
    /// The request's schema or grammar does not compile (an unsupported feature, a bad schema);
    /// `param` is the OpenAI field it came from ([`Constraint::param`]).
    #[error("{param}: {message}")]
    Compile {
        param: &'static str,
        message: String,
    },
}

/// What every constrained request of a worker shares: the parser factory over its vocabulary,
/// and its end tokens (all a failed matcher allows).
pub struct Grammars {
    factory: ParserFactory,
    ends: Arc<SimpleVob>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// The factory for a model whose tokenizer and stop ids `kit` holds, and whose logits have
    /// `vocab_size` entries.
    pub fn new(kit: Arc<PromptKit>, vocab_size: usize) -> Result<Arc<Self>, GrammarError> {
        let bad = |e: anyhow::Error| GrammarError::Tokenizer(format!("{e:#}"));
        let tokenizer_json = serde_json::to_value(kit.tokenizer())
            .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        let stop_ids = kit.stop_token_ids().to_vec();
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&tokenizer_json).map_err(bad)?;
        if words.len() > vocab_size {
            return Err(GrammarError::Tokenizer(format!(
                "the tokenizer has {} tokens, the model's logits {vocab_size}",
                words.len()
            )));
        }
        // Rows of the logits beyond the tokenizer (padding) are tokens no text can be.
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let first_stop = stop_ids.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(vocab_size as u32, first_stop);
        let mut trie = TokTrie::from(&info, &words);
        if stop_ids.len() > 1 {
            trie = trie.with_eos_tokens(&stop_ids);
        }
        let env: toktrie::TokEnv = Arc::new(KitEnv { kit, trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(bad)?;
        // Errors go back to the caller, not to this process's stderr.
        factory.quiet();
        let ends = Arc::new(factory.tok_env().tok_trie().eos_token_set());
        Ok(Arc::new(Grammars { factory, ends }))
    }

    /// A fresh guide for one answer.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, GrammarError> {
        let grammar = match constraint {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object"}))
            }
            Constraint::JsonSchema { schema } => TopLevelGrammar::from_json_schema(schema.clone()),
            Constraint::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        };
        let failed = |message: String| GrammarError::Compile {
            param: constraint.param(),
            message,
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| failed(format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(failed(error));
        }
        Ok(Guide {
            matcher,
            ends: self.ends.clone(),
        })
    }
}

/// The token trie with the worker's tokenizer behind it.
struct KitEnv {
    kit: Arc<PromptKit>,
    trie: TokTrie,
}

impl TokenizerEnv for KitEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.kit.encode(text, false).unwrap_or_default()
        })
    }
}

/// One answer's matcher.
pub struct Guide {
    matcher: Matcher,
    /// The end tokens: all that is allowed once the matcher has failed.
    ends: Arc<SimpleVob>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Guide {
    /// The tokens allowed next: the end tokens when the output is complete, or when the
    /// matcher has failed (which ends the answer).
    pub fn mask(&mut self) -> SimpleVob {
        self.matcher
            .compute_mask_or_eos()
            .unwrap_or_else(|_| SimpleVob::clone(&self.ends))
    }

    /// An independent copy in the same state (another answer of the same request, without
    /// compiling its grammar again).
    pub fn fork(&self) -> Guide {
        Guide {
            matcher: self.matcher.deep_clone(),
            ends: self.ends.clone(),
        }
    }

    /// Follows the chosen token. An end token is not fed: generation stops on it.
    pub fn advance(&mut self, token: u32) {
        // A token the mask allowed is accepted; an error leaves the matcher failed, and the
        // next mask ends the answer.
        let _ = self.matcher.consume_token(token);
    }
}

/// Sets every logit the mask does not allow to minus infinity.
pub fn apply_mask(row: &mut [f32], mask: &SimpleVob) {
    // Walks the mask a word at a time: words of allowed tokens cost nothing.
    mask.iter_unset_entries(|token| {
        if let Some(logit) = row.get_mut(token) {
            *logit = f32::NEG_INFINITY;
        }
    });
}
