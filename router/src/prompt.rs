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
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: crate::http::HttpError,
    },
    #[error("{url}: not UTF-8: {source}")]
    Utf8 {
        url: String,
        #[source]
        source: std::str::Utf8Error,
    },
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
    let body = http
        .get_body(&url, FETCH_TIMEOUT)
        .await
        .map_err(|source| KitError::Http {
            url: url.clone(),
            source,
        })?;
    let text = std::str::from_utf8(&body).map_err(|source| KitError::Utf8 {
        url: url.clone(),
        source,
    })?;
    PromptKit::from_json(text).map_err(|source| KitError::Kit {
        url: url.clone(),
        source,
    })
}
