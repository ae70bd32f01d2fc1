//! The router's tokenizer and chat template come from the workers (`GET /v1/tokenizer`, a
//! [`PromptKit`] in its JSON form), so the router needs no model files, and a prompt's token ids
//! are the worker's own: one tokenizer, one template, built in one place (`tidelock-prompt`).

use std::time::Duration;

use tidelock_prompt::PromptKit;

use crate::http::Http;

/// How long fetching a tokenizer may take (it can be a few MB of JSON).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a worker's tokenizer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{url}: {problem}")]
    Http { url: String, problem: String },
    #[error("{url}: not a tokenizer: {source}")]
    Kit {
        url: String,
        #[source]
        source: tidelock_prompt::PromptError,
    },
}

/// Fetches (through `http`) and builds the tokenizer and chat template of the worker at
/// `base_url`.
pub async fn fetch_kit(http: &Http, base_url: &str) -> Result<PromptKit, KitError> {
    let url = format!("{}/v1/tokenizer", base_url.trim_end_matches('/'));
    let failed = |problem: String| KitError::Http {
        url: url.clone(),
        problem,
    };
    let body = http.get_body(&url, FETCH_TIMEOUT).await.map_err(failed)?;
    let text = std::str::from_utf8(&body).map_err(|e| failed(format!("not UTF-8: {e}")))?;
    PromptKit::from_json(text).map_err(|source| KitError::Kit {
        url: url.clone(),
        source,
    })
}
