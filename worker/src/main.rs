//! `tidelock-worker`: holds a model and its paged, prefix-cached KV cache and serves generation to
//! routers (DESIGN.md, "Worker API").
//!
//! Not built yet: the model runtime, KV pool and scheduler arrive with issue #3. Until then the
//! binary says so and exits non-zero rather than pretending to serve.

use clap::Parser;

/// Tidelock worker (not implemented yet: issue #3).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {}

fn main() -> std::process::ExitCode {
    let _config = Config::parse();
    eprintln!("tidelock-worker: the worker is not implemented yet (issue #3); nothing is served");
    std::process::ExitCode::from(2)
}
