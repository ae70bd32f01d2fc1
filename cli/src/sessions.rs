//! `tidelock bench sessions`: the multi-turn workload of issue #8. K sessions talk to an
//! OpenAI-compatible endpoint at once through `/v1/chat/completions`, streamed; each turn
//! resends the whole conversation (the previous answers included) plus a new user message, after
//! a think time, under the session's `prompt_cache_key`. Sessions are spread over the API keys
//! given (several tenants), and a share of them open with one common system prompt while the
//! others have their own, so some prefixes are shared across sessions and tenants.
//!
//! Measured: per turn, time to first token and prompt and cached tokens; the summary gives the
//! hit rate of first turns and of later turns (a later turn should find everything its session
//! sent before), and TTFT percentiles of each.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::{Outcome, ms, quantile, stream};
use crate::config::SessionsArgs;
use crate::http::{Api, connect};

/// Words the generated messages are made of.
const VOCABULARY: &[&str] = &[
    "tide", "moon", "harbour", "wind", "boat", "river", "stone", "light", "north", "water",
    "evening", "morning", "island", "storm", "sand", "rope", "sail", "bridge", "market", "garden",
    "letter", "window", "winter", "summer", "friend", "story", "question", "answer", "map", "road",
];

/// `n` words, a fixed walk per `seed`.
/// A streamed, greedy chat request with usage, under the session `cache_key`; `ignore_eos` makes
/// every answer exactly `max_tokens` long (what a comparison of answers needs).
pub(crate) fn chat_body(
    model: &str,
    messages: &[serde_json::Value],
    max_tokens: u32,
    cache_key: &str,
    ignore_eos: bool,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "prompt_cache_key": cache_key,
    });
    if ignore_eos {
        body["ignore_eos"] = serde_json::json!(true);
    }
    body
}

pub(crate) fn words(n: usize, seed: u64) -> String {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push(VOCABULARY[(s >> 33) as usize % VOCABULARY.len()]);
    }
    out.join(" ")
}

/// One turn's numbers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Turn {
    session: usize,
    pub(crate) turn: usize,
    tenant: usize,
    shared_system: bool,
    #[serde(flatten)]
    pub(crate) outcome: Outcome,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Summary {
    sessions: usize,
    turns: usize,
    pub(crate) errors: usize,
    first_turn_hit_rate: f64,
    pub(crate) later_turn_hit_rate: f64,
    /// The most later turns could find: each its session's previous prompt and answer (less the
    /// answer's last token, never computed), over their prompt tokens.
    pub(crate) later_turn_bound: f64,
    first_turn_ttft_p50_s: f64,
    first_turn_ttft_p90_s: f64,
    later_turn_ttft_p50_s: f64,
    later_turn_ttft_p90_s: f64,
    later_turn_ttft_p99_s: f64,
    duration_s: f64,
}

fn hit_rate<'a>(turns: impl Iterator<Item = &'a Turn>) -> f64 {
    let (cached, prompt) = turns.fold((0, 0), |(c, p), t| {
        (c + t.outcome.cached_tokens, p + t.outcome.prompt_tokens)
    });
    if prompt == 0 {
        0.0
    } else {
        cached as f64 / prompt as f64
    }
}

fn summarise(turns: &[Turn], sessions: usize, duration: Duration) -> Summary {
    let ok: Vec<&Turn> = turns.iter().filter(|t| t.outcome.error.is_none()).collect();
    let ttfts = |first: bool| -> Vec<f64> {
        ok.iter()
            .filter(|t| (t.turn == 1) == first)
            .filter_map(|t| t.outcome.ttft_s)
            .collect()
    };
    let (first, later) = (ttfts(true), ttfts(false));
    let (mut reachable, mut prompt) = (0, 0);
    for pair in ok.windows(2) {
        let (before, turn) = (pair[0], pair[1]);
        if turn.session == before.session && turn.turn == before.turn + 1 {
            let had = before.outcome.prompt_tokens + before.outcome.completion_tokens;
            reachable += had.saturating_sub(1).min(turn.outcome.prompt_tokens);
            prompt += turn.outcome.prompt_tokens;
        }
    }
    Summary {
        sessions,
        turns: turns.len(),
        errors: turns.len() - ok.len(),
        first_turn_hit_rate: hit_rate(ok.iter().copied().filter(|t| t.turn == 1)),
        later_turn_hit_rate: hit_rate(ok.iter().copied().filter(|t| t.turn > 1)),
        later_turn_bound: if prompt == 0 {
            0.0
        } else {
            reachable as f64 / prompt as f64
        },
        first_turn_ttft_p50_s: quantile(&first, 0.5),
        first_turn_ttft_p90_s: quantile(&first, 0.9),
        later_turn_ttft_p50_s: quantile(&later, 0.5),
        later_turn_ttft_p90_s: quantile(&later, 0.9),
        later_turn_ttft_p99_s: quantile(&later, 0.99),
        duration_s: duration.as_secs_f64(),
    }
}

/// How later turns fared from a disruption of the workers on (`tidelock bench compare
/// --disrupt`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Disrupted {
    /// Later turns sent from the disruption's start on, and how many of them failed.
    pub(crate) turns: usize,
    pub(crate) errors: usize,
    /// Later turns sent while the disruption went on, their token hit rate, and the most they
    /// could find (their sessions' previous turns).
    pub(crate) during: usize,
    pub(crate) hit_rate: f64,
    pub(crate) bound: f64,
    /// Sessions with a later turn sent from the disruption's start on, and, over each one's
    /// first such turn (the first to meet the disruption), the cached tokens over what its
    /// previous turn had (prompt and answer, less the answer's last token): the share of the
    /// sessions' cached prefix that the disruption left cached.
    pub(crate) sessions: usize,
    pub(crate) kept: f64,
}

/// [`Disrupted`] for a disruption from `began_s` to `ended_s`, seconds into the workload.
pub(crate) fn disrupted(turns: &[Turn], began_s: f64, ended_s: f64) -> Disrupted {
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (mut n, mut errors, mut during) = (0, 0, 0);
    let (mut cached, mut prompt, mut reachable) = (0u64, 0u64, 0u64);
    let (mut after_cached, mut after_had) = (0u64, 0u64);
    let mut seen_after = std::collections::HashSet::new();
    for pair in turns.windows(2) {
        let (before, turn) = (&pair[0], &pair[1]);
        if turn.session != before.session
            || turn.turn != before.turn + 1
            || turn.outcome.sent_at_s < began_s
        {
            continue;
        }
        n += 1;
        if turn.outcome.error.is_some() || before.outcome.error.is_some() {
            errors += 1;
            continue;
        }
        let had = (before.outcome.prompt_tokens + before.outcome.completion_tokens)
            .saturating_sub(1)
            .min(turn.outcome.prompt_tokens);
        if turn.outcome.sent_at_s < ended_s {
            during += 1;
            cached += turn.outcome.cached_tokens;
            prompt += turn.outcome.prompt_tokens;
            reachable += had;
        }
        if seen_after.insert(turn.session) {
            after_cached += turn.outcome.cached_tokens.min(had);
            after_had += had;
        }
    }
    Disrupted {
        turns: n,
        errors,
        during,
        hit_rate: ratio(cached, prompt),
        bound: ratio(reachable, prompt),
        sessions: seen_after.len(),
        kept: ratio(after_cached, after_had),
    }
}

/// One session from its first turn to its last; a failed turn ends it.
async fn session(
    api: Arc<Api>,
    model: String,
    args: Arc<SessionsArgs>,
    index: usize,
    tenant: usize,
    started: Instant,
) -> Vec<Turn> {
    let shared = (index as f64) < args.workload.shared * args.workload.sessions as f64;
    let system = if shared {
        words(args.workload.system_words, 0)
    } else {
        words(args.workload.system_words, 1 + index as u64)
    };
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    let mut turns = Vec::with_capacity(args.workload.turns);
    for turn in 1..=args.workload.turns {
        let question = words(
            args.workload.message_words,
            (index as u64) << 32 | turn as u64,
        );
        messages.push(serde_json::json!({"role": "user", "content": question}));
        let body = chat_body(
            &model,
            &messages,
            args.workload.max_tokens,
            &format!("bench-session-{index}"),
            false,
        );
        let (outcome, answer) =
            stream(&api, "/chat/completions", body, index, started.elapsed()).await;
        let failed = outcome.error.is_some();
        turns.push(Turn {
            session: index,
            turn,
            tenant,
            shared_system: shared,
            outcome,
        });
        if failed {
            break;
        }
        messages.push(serde_json::json!({"role": "assistant", "content": answer}));
        tokio::time::sleep(Duration::from_millis(args.workload.think_ms)).await;
    }
    turns
}

/// `bench sessions`: the summary table on stdout (progress and notes go to stderr).
pub(crate) async fn run(args: SessionsArgs) -> ExitCode {
    let held = sessions(args).await;
    if let Ok((summary, _)) = &held {
        print_summary(summary);
    }
    match held {
        Ok((summary, _)) if summary.errors == 0 => ExitCode::SUCCESS,
        Ok((summary, _)) => {
            eprintln!(
                "tidelock bench sessions: {} turns failed (see --out for each error)",
                summary.errors
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tidelock bench sessions: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) async fn sessions(args: SessionsArgs) -> Result<(Summary, Vec<Turn>), String> {
    if args.workload.sessions == 0
        || args.workload.turns == 0
        || !(0.0..=1.0).contains(&args.workload.shared)
    {
        return Err("--sessions and --turns must be at least 1, --shared within 0..1".into());
    }
    let (api, model) = connect(&args.endpoint).await?;
    // One client per tenant key; without --api-keys, the endpoint's key for every session.
    let apis: Vec<Arc<Api>> = if args.api_keys.is_empty() {
        vec![Arc::new(api)]
    } else {
        args.api_keys
            .iter()
            .map(|k| Api::new(&args.endpoint.url, Some(k.clone())).map(Arc::new))
            .collect::<Result<_, _>>()?
    };
    eprintln!(
        "{} sessions of {} turns over {} tenant key(s) against {} ({} share a system prompt of {} words)",
        args.workload.sessions,
        args.workload.turns,
        apis.len(),
        args.endpoint.url,
        (args.workload.shared * args.workload.sessions as f64).ceil(),
        args.workload.system_words
    );
    let args = Arc::new(args);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.workload.sessions)
        .map(|i| {
            let tenant = i % apis.len();
            tokio::spawn(session(
                apis[tenant].clone(),
                model.clone(),
                args.clone(),
                i,
                tenant,
                started,
            ))
        })
        .collect();
    let mut turns = Vec::new();
    for task in tasks {
        turns.extend(
            task.await
                .map_err(|e| format!("a session task failed: {e}"))?,
        );
    }
    let summary = summarise(&turns, args.workload.sessions, started.elapsed());
    if let Some(out) = &args.out {
        let json = serde_json::json!({"summary": summary, "turns": turns});
        crate::bench::write_json(out, &json)?;
    }
    Ok((summary, turns))
}

/// The summary table, on stdout (`bench sessions`' result).
fn print_summary(s: &Summary) {
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| sessions, turns (errors) | {}, {} ({}) |",
        s.sessions, s.turns, s.errors
    );
    println!(
        "| token hit rate, first turns / later turns | {:.3} / {:.3} |",
        s.first_turn_hit_rate, s.later_turn_hit_rate
    );
    println!(
        "| later turns' bound (previous prompt + answer / prompt tokens) | {:.3} |",
        s.later_turn_bound
    );
    println!(
        "| TTFT first turns p50 / p90 | {} / {} |",
        ms(s.first_turn_ttft_p50_s),
        ms(s.first_turn_ttft_p90_s)
    );
    println!(
        "| TTFT later turns p50 / p90 / p99 | {} / {} / {} |",
        ms(s.later_turn_ttft_p50_s),
        ms(s.later_turn_ttft_p90_s),
        ms(s.later_turn_ttft_p99_s)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_fixed_per_seed_and_differ_between_seeds() {
        assert_eq!(words(12, 3), words(12, 3));
        assert_ne!(words(12, 3), words(12, 4));
        assert_eq!(words(5, 9).split(' ').count(), 5);
    }

    fn turn(session: usize, turn: usize, at: f64, prompt: u64, cached: u64, ok: bool) -> Turn {
        Turn {
            session,
            turn,
            tenant: 0,
            shared_system: false,
            outcome: Outcome {
                sent_at_s: at,
                prompt_tokens: prompt,
                cached_tokens: cached,
                completion_tokens: 11,
                error: (!ok).then(|| "HTTP 503".into()),
                ..Outcome::default()
            },
        }
    }

    #[test]
    fn a_disruption_counts_later_turns_during_it_and_what_each_session_kept_at_its_first_turn() {
        let turns = [
            // Session 0: turn 2 before the disruption (not counted), turn 3 during it (the
            // first to meet it: 120 + 11 - 1 = 130 reachable, 128 found), turn 4 after it.
            turn(0, 1, 0.0, 100, 0, true),
            turn(0, 2, 1.0, 120, 100, true),
            turn(0, 3, 5.0, 150, 128, true),
            turn(0, 4, 12.0, 200, 80, true),
            // Session 1: its first turn from the disruption's start on (after its end) found
            // everything; the second one is not its first.
            turn(1, 1, 0.0, 100, 0, true),
            turn(1, 2, 11.0, 130, 110, true),
            turn(1, 3, 13.0, 160, 140, true),
            // Session 2: a failed turn during the disruption.
            turn(2, 1, 0.0, 100, 0, true),
            turn(2, 2, 6.0, 0, 0, false),
        ];
        let d = disrupted(&turns, 4.0, 10.0);
        assert_eq!((d.turns, d.errors, d.during, d.sessions), (5, 1, 1, 2));
        // During: session 0's turn 3 alone (the failed one is counted as an error).
        assert!((d.hit_rate - 128.0 / 150.0).abs() < 1e-12);
        assert!((d.bound - 130.0 / 150.0).abs() < 1e-12);
        // Kept: session 0's turn 3 (130 reachable), session 1's turn 2 (110 reachable).
        assert!((d.kept - (128.0 + 110.0) / (130.0 + 110.0)).abs() < 1e-12);
    }
}
