//! `tidelock`: the command a newcomer runs first.
//!
//! Today it has one subcommand, `up`, which checks what the local cluster needs and says plainly
//! what is missing. The local cluster itself (router and workers on loopback) arrives with issue
//! #5; until then `up` never pretends to serve: it exits non-zero after its report.

mod config;
mod up;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = config::Cli::parse();
    match cli.command {
        config::Command::Up(args) => up::run(&args),
    }
}
