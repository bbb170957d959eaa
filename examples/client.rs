//! The smallest RAAS client: `cargo run --example client -- [ADDR] LINE...` sends each
//! LINE to ADDR (default 127.0.0.1:2200) and prints the replies.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // The first argument is the address only if it reads as one.
    let addr = match args.first().map(|a| a.parse::<SocketAddr>()) {
        Some(Ok(addr)) => {
            args.remove(0);
            addr
        }
        _ => SocketAddr::from(([127, 0, 0, 1], 2200)),
    };
    let mut stream = TcpStream::connect(addr)?;
    for line in &args {
        writeln!(stream, "{line}")?;
    }
    for reply in BufReader::new(stream).lines().take(args.len()) {
        println!("{}", reply?);
    }
    Ok(())
}
