//! The HTTP the CLI needs: a readiness GET on loopback, and a client for an OpenAI-compatible
//! endpoint (plain HTTP) that streams server-sent events.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::EndpointArgs;

/// `GET http://127.0.0.1:{port}{path}`: `(status, body)`, or `None` when nothing answers in time.
pub(crate) async fn get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    tidelock_localkube::http_get_within(port, path, timeout).await
}

/// A client for `endpoint`, and the model to ask for: the one given, else the first the
/// endpoint lists.
pub(crate) async fn connect(endpoint: &EndpointArgs) -> Result<(Api, String), String> {
    let api = Api::new(&endpoint.url, endpoint.api_key())?;
    let model = match &endpoint.model {
        Some(model) => model.clone(),
        None => api.get_json("/models").await?["data"][0]["id"]
            .as_str()
            .ok_or_else(|| format!("{}/models lists no model; pass --model", endpoint.url))?
            .to_owned(),
    };
    Ok((api, model))
}

/// A client for one OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    key: Option<String>,
}

impl Api {
    pub(crate) fn new(base: &str, key: Option<String>) -> Result<Self, String> {
        if base.starts_with("https://") {
            return Err(format!(
                "{base}: tidelock speaks plain HTTP only (a TLS client is not built in)"
            ));
        }
        base.parse::<hyper::Uri>()
            .map_err(|e| format!("{base}: not a URL: {e}"))?;
        Ok(Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: base.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// Sends a request; an answer that is not 2xx becomes its error message.
    pub(crate) async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let url = format!("{}{path}", self.base);
        let mut request = hyper::Request::builder().method(method).uri(&url);
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).map_err(|e| format!("{url}: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("{url}: {e} (is the server running?)"))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(format!("HTTP {status}: {message}"))
    }

    /// A GET's whole body.
    pub(crate) async fn get_text(&self, path: &str) -> Result<String, String> {
        let response = self.send(hyper::Method::GET, path, None).await?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{}{path}: {e}", self.base))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A JSON GET.
    pub(crate) async fn get_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let text = self.get_text(path).await?;
        serde_json::from_str(&text).map_err(|e| format!("{path}: not JSON: {e}"))
    }
}

/// The `data:` payloads of a server-sent event stream, one at a time.
pub(crate) struct Events {
    body: Incoming,
    /// Bytes read but not yet split into events (an event may end mid-character of a frame).
    buf: Vec<u8>,
}

impl Events {
    pub(crate) fn new(body: Incoming) -> Self {
        Events {
            body,
            buf: Vec::new(),
        }
    }

    /// The next event's data; `None` at the end of the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let bytes: Vec<u8> = self.buf.drain(..end + 2).collect();
                let event = String::from_utf8_lossy(&bytes).replace('\r', "");
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(format!("the stream broke: {e}")),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
