//! The `raasd` binary: load the configuration, then run the master.

use raasd::config::{self, LoadError};

fn main() {
    // Collected first: once the process title overwrites the argv area, the original
    // arguments are gone, and reloads and binary upgrades need them.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "ctl") {
        std::process::exit(raasd::ctl::run(&args[1..]));
    }
    let config = match config::load(&args) {
        Ok(config) => config,
        Err(LoadError::CommandLine(e)) => e.exit(),
        Err(LoadError::Help(text)) => {
            print!("{text}");
            std::process::exit(0);
        }
        Err(LoadError::File(errors)) => {
            for error in &errors {
                eprintln!("raasd: {error}");
            }
            // Started by an upgrade: the old master logs why this one failed.
            if let Ok(Some(predecessor)) = raasd::upgrade::Predecessor::from_environment() {
                predecessor.announce_failure(&errors.join("; "));
            }
            std::process::exit(2);
        }
    };
    if config.check_config {
        print!("{}", config.to_toml());
        std::process::exit(0);
    }
    std::process::exit(raasd::master::run(config, args));
}
