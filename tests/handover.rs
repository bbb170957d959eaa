//! Live connection hand-over: clients that never reconnect see no end of file, no
//! reset, every reply exactly once and in order, through reloads, resizes,
//! recycling and binary upgrades; and the fallbacks drain as before.

mod common;

use std::time::Duration;

use common::sticky::Sticky;
use common::*;
use nix::sys::signal::Signal;

#[test]
fn hup_five_times_moves_every_connection_live() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "--graceful-timeout", "10"]);
    let addr = s.addr();
    s.wait_for_log("all 2 workers accepting", SOON);
    let t = std::time::Instant::now();
    let clients = Sticky::start(addr);
    clients.wait_more(300, SOON);
    eprintln!("start took {:?}", t.elapsed());
    for round in 1..=5 {
        let old = s.wait_workers(2);
        s.signal(Signal::SIGHUP);
        s.wait_for_log_nth("all 2 workers accepting", round + 1, SOON);
        wait_until("the old workers to be gone", SOON, || {
            clients.assert_no_failure_yet();
            old.iter().all(|w| !alive(w.pid))
        });
        clients.wait_more(200, SOON);
    }
    assert!(s.count_log("handed over ") >= 5, "{}", s.log());
    assert!(s.count_log("took over ") >= 1);
    let t = std::time::Instant::now();
    let replies = clients.finish();
    eprintln!("finish took {:?}", t.elapsed());
    eprintln!("{replies} replies through 5 HUPs");
    assert_eq!(s.count_log("not taken in time"), 0, "{}", s.log());
    let _ = Duration::ZERO;
}
