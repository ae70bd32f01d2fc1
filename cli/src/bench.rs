//! `tidelock bench trace`: replays a request trace in the Mooncake format against any
//! OpenAI-compatible endpoint and measures what a tenant sees (issue #8).
//!
//! A trace line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`:
//! one id per 512-token block of the prompt. Each id becomes a fixed 512-token block of text (a
//! walk seeded by the id over words that are one token each, after a space, in the model's
//! tokenizer), so every system in front of the same tokenizer sees exactly the trace's prefix
//! structure, whether it matches prefixes on text (sglang-router, vllm-router) or on tokens
//! (Tidelock). Prompts are cut to `input_length` words; `output_length` is `max_tokens` with
//! `ignore_eos`; requests are sent at their timestamps divided by `--time-scale`, through
//! `/v1/completions`, streamed.
//!
//! Measured per request: time to first token, time per output token after it, prompt and
//! cached tokens from the final usage chunk, errors. The summary: token-weighted prefix hit
//! rate (cached / prompt tokens), next to the trace's own hit rate with an unlimited cache (the
//! leading blocks each prompt shares with an earlier one), TTFT and TPOT percentiles, throughput,
//! and with `--workers` the load imbalance (max over mean of the tokens each worker prefilled).
//! Written as JSON (`--out`) and printed as a table.

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidelock_prompt::PromptKit;

use crate::config::TraceArgs;
use crate::http::{Api, Events, connect};

/// Tokens per trace block (the Mooncake format's).
pub(crate) const TRACE_BLOCK: usize = 512;
/// Words the block text is drawn from.
const WORDS: usize = 4096;

/// One request of a trace.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TraceRequest {
    pub(crate) timestamp: u64,
    pub(crate) input_length: usize,
    pub(crate) output_length: usize,
    pub(crate) hash_ids: Vec<u64>,
}

/// Reads a trace; every error names the file and line.
pub(crate) fn read_trace(path: &Path) -> Result<Vec<TraceRequest>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let request: TraceRequest = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a trace request: {e}", path.display(), i + 1))?;
        if request.input_length > request.hash_ids.len() * TRACE_BLOCK {
            return Err(format!(
                "{}:{}: input_length {} is beyond its {} blocks of {TRACE_BLOCK}",
                path.display(),
                i + 1,
                request.input_length,
                request.hash_ids.len()
            ));
        }
        out.push(request);
    }
    Ok(out)
}

/// The trace's own hit rate with an unlimited prefix cache: per request, the tokens of its
/// leading blocks that an earlier request's prompt began with, over all prompt tokens.
pub(crate) fn ideal_hit_rate(trace: &[TraceRequest]) -> f64 {
    let mut seen: HashSet<Vec<u64>> = HashSet::new();
    let (mut hit, mut total) = (0usize, 0usize);
    for r in trace {
        let full = r.input_length / TRACE_BLOCK;
        let mut shared = 0;
        while shared < full && seen.contains(&r.hash_ids[..=shared]) {
            shared += 1;
        }
        hit += shared * TRACE_BLOCK;
        total += r.input_length;
        for n in 1..=r.hash_ids.len() {
            seen.insert(r.hash_ids[..n].to_vec());
        }
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

/// Words that are one token each after a space, and stay one token each in a row.
pub(crate) struct Words {
    words: Vec<String>,
}

impl Words {
    /// The first [`WORDS`] lowercase words of 3 to 10 letters in the vocabulary (in id order)
    /// whose space-prefixed form encodes to exactly their own token.
    pub(crate) fn from_tokenizer(kit: &PromptKit) -> Result<Words, String> {
        let mut words = Vec::with_capacity(WORDS);
        for id in 0..kit.vocab_size() as u32 {
            let Some(token) = kit.id_to_token(id) else {
                continue;
            };
            // Byte-level BPE marks a leading space with 'Ġ', SentencePiece with '▁'.
            let Some(word) = token.strip_prefix('Ġ').or_else(|| token.strip_prefix('▁')) else {
                continue;
            };
            if !(3..=10).contains(&word.len()) || !word.bytes().all(|b| b.is_ascii_lowercase()) {
                continue;
            }
            let text = format!(" {word}");
            if kit.encode(&text, false).map_err(|e| e.to_string())? == [id] {
                words.push(text);
                if words.len() == WORDS {
                    break;
                }
            }
        }
        if words.len() < WORDS {
            return Err(format!(
                "the tokenizer has only {} single-token words (need {WORDS})",
                words.len()
            ));
        }
        Ok(Words { words })
    }

    /// Block `id`'s text: [`TRACE_BLOCK`] words, a fixed walk seeded by the id.
    fn block(&self, id: u64) -> impl Iterator<Item = &str> {
        let mut s = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        (0..TRACE_BLOCK).map(move |_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.words[(s >> 33) as usize % WORDS].as_str()
        })
    }

    /// The prompt of a trace request: its blocks' words, cut to `input_length`.
    pub(crate) fn prompt(&self, r: &TraceRequest) -> String {
        r.hash_ids
            .iter()
            .flat_map(|&id| self.block(id))
            .take(r.input_length)
            .collect()
    }
}

/// What one request gave.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Outcome {
    pub(crate) index: usize,
    pub(crate) sent_at_s: f64,
    pub(crate) ttft_s: Option<f64>,
    pub(crate) tpot_s: Option<f64>,
    pub(crate) latency_s: f64,
    pub(crate) prompt_tokens: u64,
    pub(crate) cached_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) error: Option<String>,
}

/// The run's numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) requests: usize,
    pub(crate) errors: usize,
    pub(crate) duration_s: f64,
    pub(crate) prompt_tokens: u64,
    pub(crate) cached_tokens: u64,
    pub(crate) hit_rate: f64,
    pub(crate) ideal_hit_rate: f64,
    pub(crate) ttft_p50_s: f64,
    pub(crate) ttft_p90_s: f64,
    pub(crate) ttft_p99_s: f64,
    pub(crate) tpot_p50_s: f64,
    pub(crate) tpot_p90_s: f64,
    pub(crate) output_tokens_per_s: f64,
    pub(crate) requests_per_s: f64,
    /// Tokens each worker prefilled during the run (when `--workers` was given).
    pub(crate) prefill_tokens_per_worker: Vec<u64>,
    /// Max over mean of those (0 when not measured).
    pub(crate) imbalance: f64,
}

/// The `q` quantile (0..=1) of `xs` by nearest rank; 0 when empty.
pub(crate) fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn summarise(outcomes: &[Outcome], duration: Duration, ideal: f64) -> Summary {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|o| o.tpot_s).collect();
    let prompt: u64 = ok.iter().map(|o| o.prompt_tokens).sum();
    let cached: u64 = ok.iter().map(|o| o.cached_tokens).sum();
    let output: u64 = ok.iter().map(|o| o.completion_tokens).sum();
    let secs = duration.as_secs_f64().max(1e-9);
    Summary {
        requests: outcomes.len(),
        errors: outcomes.len() - ok.len(),
        duration_s: duration.as_secs_f64(),
        prompt_tokens: prompt,
        cached_tokens: cached,
        hit_rate: if prompt == 0 {
            0.0
        } else {
            cached as f64 / prompt as f64
        },
        ideal_hit_rate: ideal,
        ttft_p50_s: quantile(&ttft, 0.5),
        ttft_p90_s: quantile(&ttft, 0.9),
        ttft_p99_s: quantile(&ttft, 0.99),
        tpot_p50_s: quantile(&tpot, 0.5),
        tpot_p90_s: quantile(&tpot, 0.9),
        output_tokens_per_s: output as f64 / secs,
        requests_per_s: ok.len() as f64 / secs,
        prefill_tokens_per_worker: Vec::new(),
        imbalance: 0.0,
    }
}

/// Distinct hash ids (blocks) in `trace`.
pub(crate) fn unique_blocks(trace: &[TraceRequest]) -> u64 {
    let ids: std::collections::HashSet<u64> = trace
        .iter()
        .flat_map(|r| r.hash_ids.iter().copied())
        .collect();
    ids.len() as u64
}

/// Max over mean of `loads` (0 when empty or all zero).
pub(crate) fn imbalance(loads: &[u64]) -> f64 {
    let total: u64 = loads.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mean = total as f64 / loads.len() as f64;
    loads.iter().copied().max().unwrap_or(0) as f64 / mean
}

/// Each worker's `tidelock_worker_prefill_tokens_total`.
pub(crate) async fn prefill_counters(workers: &[String]) -> Result<Vec<u64>, String> {
    const NAME: &str = "tidelock_worker_prefill_tokens_total";
    let mut out = Vec::with_capacity(workers.len());
    for base in workers {
        let text = Api::new(base, None)?.get_text("/metrics").await?;
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(NAME)?.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("{base}/metrics has no {NAME}"))?;
        out.push(value as u64);
    }
    Ok(out)
}

/// Sends one streamed request to `path` (`/completions` or `/chat/completions`) and reads it to
/// the end; returns its numbers and the text it generated.
pub(crate) async fn stream(
    api: &Api,
    path: &str,
    body: serde_json::Value,
    index: usize,
    sent_at: Duration,
) -> (Outcome, String) {
    let mut text = String::new();
    let mut outcome = Outcome {
        index,
        sent_at_s: sent_at.as_secs_f64(),
        ..Outcome::default()
    };
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = started;
    let result: Result<(), String> = async {
        let response = api.send(hyper::Method::POST, path, Some(body)).await?;
        let mut events = Events::new(response.into_body());
        while let Some(data) = events.next().await? {
            if data == "[DONE]" {
                break;
            }
            let chunk: serde_json::Value =
                serde_json::from_str(&data).map_err(|e| format!("a bad chunk: {e}: {data}"))?;
            if let Some(error) = chunk.get("error") {
                return Err(format!("error in the stream: {error}"));
            }
            let mut has_text = false;
            for choice in chunk["choices"].as_array().into_iter().flatten() {
                let delta = choice["text"]
                    .as_str()
                    .or_else(|| choice["delta"]["content"].as_str())
                    .unwrap_or_default();
                has_text |= !delta.is_empty();
                text.push_str(delta);
            }
            if has_text {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
            }
            if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                outcome.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
                outcome.completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
                outcome.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
        }
        Ok(())
    }
    .await;
    outcome.latency_s = started.elapsed().as_secs_f64();
    if let Some(first) = first {
        outcome.ttft_s = Some((first - started).as_secs_f64());
        if outcome.completion_tokens > 1 {
            outcome.tpot_s =
                Some((last - first).as_secs_f64() / (outcome.completion_tokens - 1) as f64);
        }
    }
    if let Err(e) = result {
        outcome.error = Some(e);
    } else if outcome.prompt_tokens == 0 {
        outcome.error = Some("the stream ended without usage".into());
    }
    (outcome, text)
}

/// `bench trace`: the summary table on stdout (progress and notes go to stderr).
pub(crate) async fn run(args: TraceArgs) -> ExitCode {
    let replayed = replay(&args).await;
    if let Ok((summary, _)) = &replayed {
        print_summary(summary);
    }
    match replayed {
        Ok((summary, _)) if summary.errors == 0 || args.allow_errors => ExitCode::SUCCESS,
        Ok((summary, _)) => {
            eprintln!(
                "tidelock bench trace: {} of {} requests failed (see --out for each error)",
                summary.errors, summary.requests
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tidelock bench trace: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Replays the trace against the endpoint: its summary (printed by the caller) and each
/// request's outcome, written to `--out` when given.
pub(crate) async fn replay(args: &TraceArgs) -> Result<(Summary, Vec<Outcome>), String> {
    if args.workload.time_scale.is_nan() || args.workload.time_scale <= 0.0 {
        return Err(format!(
            "--time-scale must be above 0, got {}",
            args.workload.time_scale
        ));
    }
    let mut trace = read_trace(&args.workload.trace)?;
    if let Some(limit) = args.workload.limit {
        trace.truncate(limit);
    }
    if trace.is_empty() {
        return Err(format!("{}: no requests", args.workload.trace.display()));
    }
    let tokenizer = args.tokenizer_path();
    eprintln!("reading the tokenizer of {}", tokenizer.display());
    let kit = PromptKit::from_gguf_file(&tokenizer)
        .map_err(|e| format!("tokenizer {}: {e}", tokenizer.display()))?;
    let words = Words::from_tokenizer(&kit)?;
    // The block structure survives tokenization: checked on the first request's prompt.
    let check = words.prompt(&trace[0]);
    let tokens = kit.encode(&check, false).map_err(|e| e.to_string())?;
    if tokens.len() != trace[0].input_length {
        return Err(format!(
            "a {}-word prompt encodes to {} tokens: this tokenizer does not keep the words apart",
            trace[0].input_length,
            tokens.len()
        ));
    }
    let ideal = ideal_hit_rate(&trace);
    let (api, model) = connect(&args.endpoint).await?;
    let api = Arc::new(api);
    let total = trace.len();
    let span = Duration::from_secs_f64(
        trace.last().map_or(0, |r| r.timestamp) as f64 / 1000.0 / args.workload.time_scale,
    );
    eprintln!(
        "replaying {total} requests of {} over {:.1} s (time scale {}) against {}",
        args.workload.trace.display(),
        span.as_secs_f64(),
        args.workload.time_scale,
        args.endpoint.url
    );
    let words = Arc::new(words);
    let before = prefill_counters(&args.workers).await?;
    let started = Instant::now();
    let t0 = trace[0].timestamp;
    let mut tasks = Vec::with_capacity(total);
    for (index, r) in trace.into_iter().enumerate() {
        let at = Duration::from_secs_f64(
            (r.timestamp - t0.min(r.timestamp)) as f64 / 1000.0 / args.workload.time_scale,
        );
        let (api, words) = (api.clone(), words.clone());
        let mut body = serde_json::json!({
            "model": model,
            "max_tokens": r.output_length.min(args.workload.max_output.unwrap_or(usize::MAX)).max(1),
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
            body["prompt"] = serde_json::Value::String(words.prompt(&r));
            stream(&api, "/completions", body, index, started.elapsed())
                .await
                .0
        }));
    }
    let mut outcomes = Vec::with_capacity(total);
    let mut last_note = Instant::now();
    for task in tasks {
        outcomes.push(
            task.await
                .map_err(|e| format!("a request task failed: {e}"))?,
        );
        if last_note.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {} of {total} done ({:.0} s)",
                outcomes.len(),
                started.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
    }
    let mut summary = summarise(&outcomes, started.elapsed(), ideal);
    let after = prefill_counters(&args.workers).await?;
    summary.prefill_tokens_per_worker = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    summary.imbalance = imbalance(&summary.prefill_tokens_per_worker);
    if let Some(out) = &args.out {
        let json = serde_json::json!({
            "trace": args.workload.trace,
            "url": args.endpoint.url,
            "time_scale": args.workload.time_scale,
            "summary": summary,
            "requests": outcomes,
        });
        write_json(out, &json)?;
    }
    Ok((summary, outcomes))
}

/// Writes `json` to `path`, pretty, and says so.
pub(crate) fn write_json(path: &Path, json: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(json).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Milliseconds, for tables.
pub(crate) fn ms(x: f64) -> String {
    format!("{:.1} ms", x * 1e3)
}

fn print_summary(s: &Summary) {
    println!("| measure | value |");
    println!("|---|---|");
    println!("| requests (errors) | {} ({}) |", s.requests, s.errors);
    println!(
        "| token hit rate (cached / prompt tokens) | {:.3} ({} / {}) |",
        s.hit_rate, s.cached_tokens, s.prompt_tokens
    );
    println!(
        "| the trace's hit rate with an unlimited cache | {:.3} |",
        s.ideal_hit_rate
    );
    println!(
        "| TTFT p50 / p90 / p99 | {} / {} / {} |",
        ms(s.ttft_p50_s),
        ms(s.ttft_p90_s),
        ms(s.ttft_p99_s)
    );
    println!(
        "| time per output token p50 / p90 | {} / {} |",
        ms(s.tpot_p50_s),
        ms(s.tpot_p90_s)
    );
    println!(
        "| throughput | {:.1} output tokens/s, {:.2} requests/s over {:.1} s |",
        s.output_tokens_per_s, s.requests_per_s, s.duration_s
    );
    if !s.prefill_tokens_per_worker.is_empty() {
        println!(
            "| load imbalance (max / mean prefill tokens over {} workers) | {:.2} |",
            s.prefill_tokens_per_worker.len(),
            s.imbalance
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(t: u64, input: usize, ids: &[u64]) -> TraceRequest {
        TraceRequest {
            timestamp: t,
            input_length: input,
            output_length: 4,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn the_ideal_hit_rate_counts_leading_blocks_seen_before() {
        let trace = [
            request(0, 1024, &[1, 2]),
            // Shares block 1 only as a prefix: its second block differs.
            request(1, 1536, &[1, 3, 4]),
            // Shares 1, 2: both full blocks.
            request(2, 1100, &[1, 2, 5]),
            // Block 2 alone is not a prefix of anything seen.
            request(3, 512, &[2]),
        ];
        let hit = 512 + 1024;
        let total = 1024 + 1536 + 1100 + 512;
        assert_eq!(ideal_hit_rate(&trace), hit as f64 / total as f64);
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[10, 10, 10, 10]), 1.0);
        assert_eq!(imbalance(&[40, 0, 0, 0]), 4.0);
        assert_eq!(imbalance(&[30, 10]), 1.5);
        assert_eq!(imbalance(&[]), 0.0);
        assert_eq!(imbalance(&[0, 0]), 0.0);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.5), 50.0);
        assert_eq!(quantile(&xs, 0.9), 90.0);
        assert_eq!(quantile(&xs, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
