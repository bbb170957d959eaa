//! `raas`: the RAAS client. Without a subcommand it pipes stdin through a server to
//! stdout, one reply per line, in order, surviving server restarts; `raas bench` is a
//! load generator that verifies every reply.
//!
//! This file owns the command line and the exit statuses (0 done, 1 gave up or
//! failed, 2 usage error); each mode lives in its own module:
//!
//! | module | owns |
//! |---|---|
//! | [`addr`] | parsing `HOST:PORT` / `unix:PATH` and opening sockets to it |
//! | [`pipe`] | the stdin-to-stdout client and its reconnect loop |
//! | [`window`] | the bounded window of lines sent but not yet answered |
//! | [`backoff`] | reconnect delays: exponential, jittered, bounded in total |
//! | [`bench`] | `raas bench`: load, verification, statistics, chaos |
//! | [`rng`] | a small non-cryptographic random generator (jitter, test text) |
//! | [`rlimit`] | raising the open-files limit |

mod addr;
mod backoff;
mod bench;
mod pipe;
mod rlimit;
mod rng;
mod window;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::addr::Addr;

/// raas: the RAAS ("Reverse string As A Service") client.
///
/// Sends each line of stdin to a raasd server and writes the replies (each line
/// reversed) to stdout, in order. Lines are pipelined; when the server goes away the
/// lines still unanswered are sent again after reconnecting, so every reply appears
/// exactly once.
#[derive(Parser, Debug)]
#[command(
    name = "raas",
    version,
    max_term_width = 80,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    pipe: PipeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load a server with verified requests and report throughput and latency.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct PipeArgs {
    /// Server address: HOST:PORT, [V6]:PORT, :PORT (this machine) or unix:PATH.
    #[arg(value_name = "ADDR", default_value = "127.0.0.1:2200")]
    addr: Addr,

    /// Seconds to keep retrying once attempts fail, counted from the first failure
    /// since the last reply; 0 = give up at the first failure.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = parse_secs)]
    retry_for: f64,
}

/// A non-negative, finite number of seconds.
fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds (>= 0)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ok = match cli.command {
        Some(Command::Bench(args)) => {
            if let Err(msg) = args.validate() {
                // Same form and exit status (2) as clap's own usage errors.
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, msg)
                    .exit();
            }
            bench::run(args)
        }
        None => pipe::run(&cli.pipe.addr, Duration::from_secs_f64(cli.pipe.retry_for)),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
