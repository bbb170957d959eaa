//! What the worker's seccomp filter costs per system call: the same calls timed in
//! this process (unfiltered) and in a forked child with the worker's filter installed.
//!
//!     cargo run --release --example sandbox_cost
//!
//! `getppid` and a 1-byte `sendto` + `recvfrom` on a socketpair are allowed without
//! conditions (answered from the kernel's per-call cache on Linux >= 5.11);
//! `fcntl(F_GETFL)` is allowed only with given arguments, so the filter programs run.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

const CALLS: u32 = 500_000;

/// Nanoseconds per call of each kind, in this process.
fn measure() -> [f64; 3] {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..CALLS {
            f();
        }
        start.elapsed().as_nanos() as f64 / f64::from(CALLS)
    };
    let getppid = time(&mut || {
        std::hint::black_box(nix::unistd::getppid());
    });
    let fcntl = time(&mut || {
        let _ = std::hint::black_box(nix::fcntl::fcntl(&a, nix::fcntl::FcntlArg::F_GETFL));
    });
    let mut byte = [0u8; 1];
    let pair = time(&mut || {
        let _ = (&a).write(b"x");
        let _ = (&b).read(&mut byte);
    }) / 2.0;
    [getppid, fcntl, pair]
}

/// Nanoseconds per call of each kind in a forked child with the filter installed
/// (the parent waits meanwhile, so the two never compete for a CPU).
fn measure_filtered(filter: &raasd::sandbox::filter::Filter) -> [f64; 3] {
    let (mut rx, mut tx) = UnixStream::pair().expect("socketpair");
    // SAFETY: this program has one thread; the child measures, writes its figures
    // and exits without returning.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(rx);
            filter.install().expect("install the filter");
            let figures = measure();
            let text = format!("{} {} {}", figures[0], figures[1], figures[2]);
            let _ = tx.write_all(text.as_bytes());
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(tx);
            let mut text = String::new();
            rx.read_to_string(&mut text).expect("the child's figures");
            let _ = nix::sys::wait::waitpid(child, None);
            let mut figures = [0.0; 3];
            for (slot, f) in figures.iter_mut().zip(text.split_whitespace()) {
                *slot = f.parse().expect("a figure");
            }
            figures
        }
    }
}

const ROUNDS: usize = 7;

fn main() {
    let filter = match raasd::sandbox::compiled() {
        Ok(filter) => filter,
        Err(why) => {
            eprintln!("sandbox_cost: {why}");
            std::process::exit(1);
        }
    };
    // Alternating rounds; the ratio of each round, then their median.
    let mut ratios = vec![Vec::new(); 3];
    let mut plain_all = vec![Vec::new(); 3];
    let mut filtered_all = vec![Vec::new(); 3];
    for _ in 0..ROUNDS {
        let plain = measure();
        let filtered = measure_filtered(filter);
        for i in 0..3 {
            ratios[i].push(filtered[i] / plain[i]);
            plain_all[i].push(plain[i]);
            filtered_all[i].push(filtered[i]);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{:<34} {:>10} {:>10} {:>14}",
        "ns per call, median of 7 rounds", "plain", "filtered", "round ratios"
    );
    for (i, name) in [
        "getppid (allowed, cached)",
        "fcntl F_GETFL (argument rule)",
        "write + read, per call (cached)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "{name:<34} {:>10.1} {:>10.1} {:>14.3}",
            median(&mut plain_all[i]),
            median(&mut filtered_all[i]),
            median(&mut ratios[i])
        );
    }
}
