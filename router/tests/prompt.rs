//! The router's tokenizer is the worker's: fetched over `GET /v1/tokenizer` from a worker serving
//! the default model's tokenizer, it gives exactly the token ids of the worker's own `/tokenize`
//! and of the kit built from the GGUF file, for text and for rendered chats.

mod support;

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::worker_with_kit;
use tidelock_prompt::{ChatMessage, PromptKit};
use tidelock_router::prompt::{KitError, fetch_kit};
use tidelock_worker::testing::model_path;

async fn worker_tokenize(addr: std::net::SocketAddr, text: &str) -> Vec<u32> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = serde_json::json!({ "prompt": text }).to_string();
    let req = hyper::Request::post(format!("http://{addr}/tokenize"))
        .header("content-type", "application/json")
        .header("authorization", support::TOKEN.authorization())
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert!(response.status().is_success());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    serde_json::from_value(v["tokens"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_token_ids_are_the_workers() {
    let local = Arc::new(PromptKit::from_gguf_file(&model_path()).unwrap());
    let running = worker_with_kit("127.0.0.1:0", 1, Some(local.clone()));
    let fetched = fetch_kit(&support::http(), &format!("http://{}", running.addr))
        .await
        .unwrap();

    for text in [
        "Hello, world!",
        "The lighthouse keeper's log, 1893: wind NNW, 42 knots; lamp lit at 17:05.",
        "Ünïcödé, emoji 🚀 and\ttabs\nand newlines   with   spaces",
        "",
    ] {
        let ours = fetched.encode(text, true).unwrap();
        assert_eq!(ours, local.encode(text, true).unwrap(), "{text:?}");
        if !text.is_empty() {
            assert_eq!(ours, worker_tokenize(running.addr, text).await, "{text:?}");
        }
    }
    let chat = [
        ChatMessage::new("system", "You answer briefly."),
        ChatMessage::new("user", "Which lighthouses still have keepers?"),
        ChatMessage::new("assistant", "A few, mostly as museums."),
        ChatMessage::new("user", "Name one."),
    ];
    let extra = serde_json::Map::new();
    assert_eq!(
        fetched.encode_chat(&chat, true, &extra).unwrap(),
        local.encode_chat(&chat, true, &extra).unwrap()
    );
    assert_eq!(fetched.stop_token_ids(), local.stop_token_ids());
    running.stop();

    // A worker without a tokenizer, and no worker at all: errors that name the URL.
    let bare = support::worker("127.0.0.1:0", 1);
    let url = format!("http://{}", bare.addr);
    match fetch_kit(&support::http(), &url).await {
        Err(KitError::Kit { url: u, .. }) => assert!(u.starts_with(&url)),
        other => panic!("{other:?}"),
    }
    bare.stop();
    let err = fetch_kit(&support::http(), &url).await.unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
}
