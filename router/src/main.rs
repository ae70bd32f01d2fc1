//! `tidelock-router`: the OpenAI-compatible endpoint tenants talk to; pins each session to the
//! workers holding its cached prefix (DESIGN.md, "Router API").
//!
//! Not built yet: it arrives with issue #4. Until then the binary says so and exits non-zero rather
//! than pretending to serve.

use clap::Parser;

/// Tidelock router (not implemented yet: issue #4).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {}

fn main() -> std::process::ExitCode {
    let _config = Config::parse();
    eprintln!("tidelock-router: the router is not implemented yet (issue #4); nothing is served");
    std::process::ExitCode::from(2)
}
