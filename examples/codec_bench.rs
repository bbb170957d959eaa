//! Measures the RAAS codec alone: nanoseconds per line for 32-byte ASCII lines fed
//! 60 KB at a time (what a worker does with one full read), and for lines of
//! multi-code-point text. No I/O: this is the user-space share of a reply.
//!
//!     cargo run --release --example codec_bench

use std::time::Instant;

use raasd::codec::{Codec, Unit};

fn per_line(label: &str, line: &str) {
    let mut input = Vec::new();
    while input.len() < 60_000 {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    let lines = input.iter().filter(|&&b| b == b'\n').count();
    let mut out = Vec::with_capacity(2 * input.len());
    let mut codec = Codec::new(Unit::Graphemes, 65536);
    let rounds = 5_000;
    let started = Instant::now();
    for _ in 0..rounds {
        out.clear();
        codec
            .feed(&input, &mut out)
            .expect("lines within the limit");
    }
    let ns = started.elapsed().as_nanos() as f64 / (rounds * lines) as f64;
    println!("{label:<28} {ns:>8.1} ns/line");
}

fn main() {
    per_line("32-byte ASCII", "line number 00000042 abcdefghij");
    per_line(
        "graphemes (flags, accents)",
        "noe\u{301}l 🇫🇷 👩‍👩‍👧 한국어 e\u{301}",
    );
}
