//! Peak memory and time of tokenizing a long text: what the router's preparation pool reserves
//! per byte of text (`tidelock_router::app::TOKENIZE_RESERVE_PER_BYTE`) rests on these figures.
//!
//! Run: `cargo run --release -p tidelock-prompt --example tokenizer_memory --
//! MODEL.gguf MEGABYTES KIND`, KIND one of `english`, `a` (`"a a a ..."`), `digits` (one token
//! a byte), `punct`. One kind per run: the peak (`VmHWM`) is the process's.

use tidelock_prompt::PromptKit;

fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tokenizer_memory MODEL.gguf MEGABYTES english|a|digits|punct|word";
    let model = args.next().ok_or(usage)?;
    let megabytes: usize = args.next().ok_or(usage)?.parse()?;
    let kind = args.next().ok_or(usage)?;
    let unit = match kind.as_str() {
        "english" => "The quick brown fox jumps over the lazy dog. ",
        "a" => "a ",
        "digits" => "1234567890",
        "punct" => "!?",
        "word" => "abcdefghij",
        _ => return Err(usage.into()),
    };
    let kit = PromptKit::from_gguf_file(std::path::Path::new(&model))?;
    let text = unit.repeat(megabytes * 1_000_000 / unit.len());
    let before = peak_kib();
    let started = std::time::Instant::now();
    let ids = kit.encode_plain(&text, false)?;
    let took = started.elapsed();
    let grew = peak_kib().saturating_sub(before) * 1024;
    println!(
        "{} bytes of {kind}: {} tokens in {:.2} s; peak memory grew {} MiB: {:.0} bytes a byte of text, {:.0} a token",
        text.len(),
        ids.len(),
        took.as_secs_f64(),
        grew >> 20,
        grew as f64 / text.len() as f64,
        grew as f64 / ids.len() as f64,
    );
    Ok(())
}
