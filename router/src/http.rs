//! The one small HTTP helper the router's background tasks share: GET a whole body, with a
//! deadline, as bytes. (The KV event follower streams instead, see [`crate::follow`].)

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// GETs `url` and returns its body; any failure (bad URL, connection, non-2xx status, timeout)
/// as a sentence that does not repeat the URL.
pub(crate) async fn get_body(url: &str, timeout: Duration) -> Result<Bytes, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    tokio::time::timeout(timeout, async {
        let response = client.get(uri).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.to_bytes())
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
}
