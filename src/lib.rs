//! raasd: a preforking master/worker server for RAAS, "Reverse string As A Service".
//!
//! The binary in `main.rs` only parses the command line and hands over to [`master::run`].
//! Each module owns one responsibility:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the command line and the validated settings |
//! | [`console`] | the control socket and the metrics endpoint, served by the master's loop |
//! | [`ctl`] | `raasd ctl`: the control socket's client |
//! | [`listeners`] | binding listen sockets and accepting from them |
//! | [`supervisor`] | every decision of the master, as a pure state machine: events and time in, actions out |
//! | [`master`] | the shell around it: signals, reaping, channels and the console as events; forking, signalling, the pid file, upgrading as actions |
//! | [`worker`] | the event loop of one worker process |
//! | [`accept_gate`] | when a worker accepts: the balancing rule, pauses, the nudge to a sibling |
//! | [`connection`] | one client connection: buffers, reading, writing, closing |
//! | [`codec`] | the RAAS line protocol, pure (bytes in, bytes out) |
//! | [`control`] | the messages on the master/worker control pipe |
//! | [`errors`] | system errors in plain words, shared by every module |
//! | [`handoff`] | live connection hand-over between workers: the queue, the wire format, both sides |
//! | [`signals`] | turning signals into counted events on a self-pipe |
//! | [`process`] | fork with signals blocked around it |
//! | [`title`] | the process title seen in `ps` and the comm name |
//! | [`logging`] | log lines that say who speaks and with which pid |
//! | [`pidfile`] | the pid file |
//! | [`scoreboard`] | the shared memory where workers publish heartbeat and counters |
//! | [`upgrade`] | the binary upgrade hand-over: successor, readiness pipe, inherited sockets |
//! | [`privileges`] | resolving `--user`/`--group` and dropping to them in workers |
//! | [`sandbox`] | the workers' seccomp-bpf allowlist: compiled once, installed at the end of a worker's set-up |

pub mod accept_gate;
pub mod codec;
pub mod config;
pub mod connection;
pub mod console;
pub mod control;
pub mod ctl;
pub mod errors;
pub mod handoff;
pub mod listeners;
pub mod logging;
pub mod master;
pub mod pidfile;
pub mod privileges;
pub mod process;
pub mod sandbox;
pub mod scoreboard;
pub mod signals;
pub mod supervisor;
pub mod title;
pub mod upgrade;
pub mod worker;
