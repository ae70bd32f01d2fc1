//! `tidelock chat`: an interactive terminal chat against any Tidelock (or OpenAI-compatible)
//! endpoint. Answers stream as they are generated; after each turn a status line shows the
//! prompt tokens, how many of them were served from the KV cache, the completion tokens and the
//! time to first token, so the context being kept is visible turn by turn. The whole
//! conversation is resent each turn (as any OpenAI client does) under one `prompt_cache_key`.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::{Value, json};

use crate::config::ChatArgs;
use crate::http::{Api, Events, connect};

pub(crate) async fn run(args: ChatArgs) -> ExitCode {
    match chat(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidelock chat: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One turn's accounting.
#[derive(Debug, Default)]
struct Turn {
    text: String,
    prompt: u64,
    cached: u64,
    completion: u64,
    ttft_ms: Option<f64>,
}

async fn chat(args: ChatArgs) -> Result<(), String> {
    let (api, model) = connect(&args.endpoint).await?;
    let mut session = args
        .session
        .clone()
        .unwrap_or_else(|| format!("chat-{:016x}", rand::random::<u64>()));
    let mut history: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({"role": "system", "content": system}));
    }
    println!(
        "Chatting with `{model}` at {} (session {session}).",
        args.endpoint.url
    );
    println!("Type a message; /reset starts over, /exit (or Ctrl-D) leaves.\n");
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("you> ");
        let _ = std::io::stdout().flush();
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| format!("reading the terminal: {e}"))?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m["role"] == "system");
                session = format!("chat-{:016x}", rand::random::<u64>());
                println!("(new conversation, session {session})\n");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": line}));
        print!("{model}> ");
        let _ = std::io::stdout().flush();
        match turn(&api, &model, &session, &history, &args).await {
            Ok(t) => {
                println!();
                let ttft = t
                    .ttft_ms
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms"));
                println!(
                    "  [prompt {} tokens, {} cached ({:.0}%), completion {}, TTFT {ttft}]\n",
                    t.prompt,
                    t.cached,
                    if t.prompt > 0 {
                        100.0 * t.cached as f64 / t.prompt as f64
                    } else {
                        0.0
                    },
                    t.completion
                );
                history.push(json!({"role": "assistant", "content": t.text}));
            }
            Err(e) => {
                println!();
                eprintln!("  error: {e}\n");
                history.pop();
            }
        }
    }
    println!();
    Ok(())
}

/// Sends the conversation, prints the answer as it streams, returns its accounting.
async fn turn(
    api: &Api,
    model: &str,
    session: &str,
    history: &[Value],
    args: &ChatArgs,
) -> Result<Turn, String> {
    let mut body = json!({
        "model": model,
        "messages": history,
        "stream": true,
        "stream_options": {"include_usage": true},
        "prompt_cache_key": session,
        "max_tokens": args.max_tokens,
    });
    if let Some(t) = args.temperature {
        body["temperature"] = json!(t);
    }
    let started = Instant::now();
    let response = api
        .send(hyper::Method::POST, "/chat/completions", Some(body))
        .await?;
    let mut events = Events::new(response.into_body());
    let mut out = Turn::default();
    while let Some(data) = events.next().await? {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value =
            serde_json::from_str(&data).map_err(|e| format!("a chunk that is not JSON: {e}"))?;
        if let Some(message) = chunk["error"]["message"].as_str() {
            return Err(message.to_owned());
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str()
            && !text.is_empty()
        {
            out.ttft_ms
                .get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
            print!("{text}");
            let _ = std::io::stdout().flush();
            out.text.push_str(text);
        }
        let usage = &chunk["usage"];
        if usage.is_object() {
            out.prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
            out.completion = usage["completion_tokens"].as_u64().unwrap_or(0);
            out.cached = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
    }
    Ok(out)
}
