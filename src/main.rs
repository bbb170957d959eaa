//! The `raasd` binary: parse the command line, then run the master.

use clap::Parser;

fn main() {
    // Parse first: once the process title overwrites the argv area, the original
    // arguments are gone, and a binary upgrade needs them.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config = raasd::config::Config::parse_from(&args);
    std::process::exit(raasd::master::run(config, args));
}
