//! The operator's console: the control socket (`--control`) and the Prometheus
//! endpoint (`--metrics`), both served by the master's own loop.
//!
//! Owns the two small request/reply protocols and their sockets: a control client
//! sends one line (a text command) and gets one JSON object back; a scraper sends an
//! HTTP GET and gets the metrics text. Every socket is non-blocking and every client
//! is bounded — a request of at most [`MAX_REQUEST`] bytes, within [`REQUEST_TIME`],
//! at most [`MAX_CLIENTS`] at once (more are told so and closed) — so that a slow,
//! hostile or garbage-spewing client can never stall supervision. It neither decides
//! nor acts: it hands the master a [`Request`] and writes back what the master
//! answers. The JSON of `status` and the metric names are documented in raasd(8).

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The longest request (a command line, or an HTTP request head).
pub const MAX_REQUEST: usize = 4096;
/// How long a client may take to send its request.
pub const REQUEST_TIME: Duration = Duration::from_secs(2);
/// How long a reply may take to be read.
const REPLY_TIME: Duration = Duration::from_secs(5);
/// Clients served at once; beyond, a client gets an error and is closed.
pub const MAX_CLIENTS: usize = 64;

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    /// Exactly this many workers.
    Workers(usize),
    Reload,
    Upgrade,
    Stop {
        quick: bool,
    },
    ReopenLogs,
    /// `GET /metrics`.
    Metrics,
    /// `GET /livez`: the master loop runs and no worker is late.
    Livez,
    /// `GET /readyz`: serving, and no stop has begun.
    Readyz,
}

/// The commands, for errors and `raasd ctl --help`.
pub const COMMANDS: &str = "status, workers N, reload, upgrade, stop [--quick], reopen-logs";

/// Parses a control command line.
pub fn parse_command(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Ok(Request::Status),
        ["workers"] => Err(format!(
            "workers needs a count: workers N (0 to {})",
            crate::config::MAX_WORKERS
        )),
        ["workers", n] => match n.parse::<usize>() {
            Ok(n) if n <= crate::config::MAX_WORKERS => Ok(Request::Workers(n)),
            _ => Err(format!(
                "workers: '{n}' is not a worker count (0 to {})",
                crate::config::MAX_WORKERS
            )),
        },
        ["reload"] => Ok(Request::Reload),
        ["upgrade"] => Ok(Request::Upgrade),
        ["stop"] => Ok(Request::Stop { quick: false }),
        ["stop", "--quick"] => Ok(Request::Stop { quick: true }),
        ["reopen-logs"] => Ok(Request::ReopenLogs),
        [] => Err(format!("empty command; commands: {COMMANDS}")),
        _ => Err(format!(
            "unknown command '{}'; commands: {COMMANDS}",
            line.trim()
        )),
    }
}

/// The JSON of a failed request.
pub fn error_reply(why: &str) -> String {
    serde_json::json!({ "ok": false, "error": why }).to_string()
}

/// Which protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Control,
    Http,
}

/// A client's stream.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

/// Where one client is.
#[derive(Debug)]
enum Phase {
    /// Reading its request, until this moment.
    Reading { until: Instant },
    /// Its request is with the master.
    Waiting,
    /// Waiting for the outcome of an upgrade (answered by [`Console::answer_upgrade`]).
    WaitingForUpgrade,
    /// Writing the reply, until this moment.
    Writing {
        reply: Vec<u8>,
        written: usize,
        until: Instant,
    },
}

/// A connected client.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    protocol: Protocol,
    request: Vec<u8>,
    phase: Phase,
    /// Identifies the client to the master (for deferred replies).
    pub id: u64,
}

/// The console's sockets and clients.
#[derive(Debug, Default)]
pub struct Console {
    control: Option<(UnixListener, PathBuf)>,
    /// The control socket's file was made by this process (not inherited from a
    /// predecessor, which still serves on it): a failed start removes it.
    made_control_file: bool,
    metrics: Option<TcpListener>,
    clients: Vec<Client>,
    next_id: u64,
}

/// What the poll set needs: a descriptor and whether to wait for reading or writing.
pub struct Interest<'a> {
    pub fd: BorrowedFd<'a>,
    pub writable: bool,
}

impl Console {
    /// After a failed start: removes the control socket file if this process made it.
    pub fn abandon(mut self) {
        let made = self.made_control_file;
        self.close_listeners(made);
    }

    /// Binds what `control` and `metrics` name — the control socket mode 0600 (only
    /// its owner, the master's user; a stale socket file is replaced, a live one is
    /// refused) — taking over the sockets a predecessor handed over (`inherited`, by
    /// name) where they still fit: the control socket at the same path, the metrics
    /// socket at the same address.
    pub fn open(
        control: Option<&Path>,
        metrics: Option<&str>,
        inherited: Vec<(String, std::os::fd::OwnedFd)>,
    ) -> Result<Console, String> {
        let mut inherited_control = None;
        let mut inherited_metrics = None;
        for (name, fd) in inherited {
            match name.as_str() {
                "control" => {
                    let listener = UnixListener::from(fd);
                    let path = listener
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
                    if path.is_some() && path.as_deref() == control {
                        inherited_control = Some(listener);
                    }
                }
                "metrics" => {
                    let listener = TcpListener::from(fd);
                    let same = listener.local_addr().ok().map(|a| a.to_string());
                    let wanted = metrics.and_then(|m| m.parse::<std::net::SocketAddr>().ok());
                    if same.is_some() && wanted.map(|w| w.to_string()) == same {
                        inherited_metrics = Some(listener);
                    }
                }
                _ => {}
            }
        }
        let mut console = Console::default();
        match (control, inherited_control) {
            (Some(path), Some(listener)) => {
                let _ = listener.set_nonblocking(true);
                console.control = Some((listener, path.to_path_buf()));
            }
            (Some(path), None) => {
                console.control = Some((bind_control(path)?, path.to_path_buf()));
                console.made_control_file = true;
            }
            (None, _) => {}
        }
        match (metrics, inherited_metrics) {
            (Some(_), Some(listener)) => {
                let _ = listener.set_nonblocking(true);
                console.metrics = Some(listener);
            }
            (Some(addr), None) => match bind_metrics(addr) {
                Ok(listener) => console.metrics = Some(listener),
                Err(e) => {
                    console.abandon();
                    return Err(e);
                }
            },
            (None, _) => {}
        }
        Ok(console)
    }

    /// The listening sockets, by name, for a successor to inherit.
    pub fn descriptors(&self) -> Vec<(&'static str, BorrowedFd<'_>)> {
        let mut out = Vec::new();
        if let Some((l, _)) = &self.control {
            out.push(("control", l.as_fd()));
        }
        if let Some(l) = &self.metrics {
            out.push(("metrics", l.as_fd()));
        }
        out
    }

    /// Stops serving new clients (a successor took the sockets over); clients
    /// already connected still get their replies.
    pub fn close_listeners(&mut self, remove_file: bool) {
        if let Some((_, path)) = self.control.take()
            && remove_file
        {
            let _ = std::fs::remove_file(path);
        }
        self.metrics = None;
    }

    /// The descriptors to poll.
    pub fn interests(&self) -> Vec<Interest<'_>> {
        let mut out = Vec::with_capacity(self.clients.len() + 2);
        if let Some((l, _)) = &self.control {
            out.push(Interest {
                fd: l.as_fd(),
                writable: false,
            });
        }
        if let Some(l) = &self.metrics {
            out.push(Interest {
                fd: l.as_fd(),
                writable: false,
            });
        }
        for c in &self.clients {
            match c.phase {
                Phase::Reading { .. } => out.push(Interest {
                    fd: c.stream.fd(),
                    writable: false,
                }),
                Phase::Writing { .. } => out.push(Interest {
                    fd: c.stream.fd(),
                    writable: true,
                }),
                Phase::Waiting | Phase::WaitingForUpgrade => {}
            }
        }
        out
    }

    /// The next moment a client's time runs out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|c| match c.phase {
                Phase::Reading { until } | Phase::Writing { until, .. } => Some(until),
                Phase::Waiting | Phase::WaitingForUpgrade => None,
            })
            .min()
    }

    /// Accepts, reads, writes and times out what is ready, without ever blocking;
    /// returns the complete requests (the master answers each with [`Console::reply`]).
    pub fn serve(&mut self, now: Instant) -> Vec<(u64, Request)> {
        self.accept(now);
        let mut requests = Vec::new();
        let mut index = 0;
        while index < self.clients.len() {
            let client = &mut self.clients[index];
            let done = match &mut client.phase {
                Phase::Reading { until } => {
                    let until = *until;
                    match read_request(client) {
                        Ok(Some(Ok(request))) => {
                            client.phase = Phase::Waiting;
                            requests.push((client.id, request));
                            false
                        }
                        Ok(Some(Err(why))) => {
                            let reply = match client.protocol {
                                // A page that is not there: 404 in words, as a
                                // browser or curl user expects.
                                Protocol::Http if why.starts_with("no such page") => {
                                    reply_bytes(client.protocol, 404, &format!("{why}\n"))
                                }
                                _ => reply_bytes(client.protocol, 400, &error_reply(&why)),
                            };
                            client.phase = Phase::Writing {
                                reply,
                                written: 0,
                                until: now + REPLY_TIME,
                            };
                            false
                        }
                        Ok(None) => now >= until,
                        Err(_) => true,
                    }
                }
                Phase::Writing {
                    reply,
                    written,
                    until,
                } => loop {
                    if *written == reply.len() {
                        break true;
                    }
                    match client.stream.write(&reply[*written..]) {
                        Ok(0) => break true,
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break now >= *until,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break true,
                    }
                },
                Phase::Waiting | Phase::WaitingForUpgrade => false,
            };
            if done {
                self.clients.swap_remove(index);
            } else {
                index += 1;
            }
        }
        requests
    }

    /// The master's answer to request `id`: a JSON object for a control client, the
    /// text for a scraper (`status` is the HTTP status).
    pub fn reply(&mut self, id: u64, status: u16, body: &str, now: Instant) {
        if let Some(client) = self.clients.iter_mut().find(|c| c.id == id) {
            let reply = reply_bytes(client.protocol, status, body);
            client.phase = Phase::Writing {
                reply,
                written: 0,
                until: now + REPLY_TIME,
            };
        }
        // Write at once what the socket takes: most replies fit in one write.
        let _ = self.serve_writes(now);
    }

    /// Request `id` is answered when the upgrade it started ends.
    pub fn await_upgrade(&mut self, id: u64) {
        if let Some(client) = self.clients.iter_mut().find(|c| c.id == id) {
            client.phase = Phase::WaitingForUpgrade;
        }
    }

    /// The upgrade ended: every client waiting for it gets `reply`.
    pub fn answer_upgrade(&mut self, reply: &str, now: Instant) {
        let waiting: Vec<u64> = self
            .clients
            .iter()
            .filter(|c| matches!(c.phase, Phase::WaitingForUpgrade))
            .map(|c| c.id)
            .collect();
        for id in waiting {
            self.reply(id, 200, reply, now);
        }
    }

    fn serve_writes(&mut self, now: Instant) -> usize {
        let before = self.clients.len();
        self.clients.retain_mut(|client| {
            let Phase::Writing {
                reply,
                written,
                until,
            } = &mut client.phase
            else {
                return true;
            };
            loop {
                if *written == reply.len() {
                    return false;
                }
                match client.stream.write(&reply[*written..]) {
                    Ok(0) => return false,
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return now < *until,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
        });
        before - self.clients.len()
    }

    /// Before the master exits: the replies owed are written, for a moment at most.
    pub fn flush(&mut self) {
        let until = Instant::now() + Duration::from_millis(500);
        while self
            .clients
            .iter()
            .any(|c| matches!(c.phase, Phase::Writing { .. }))
            && Instant::now() < until
        {
            self.serve_writes(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let accepted = match (&self.control, &self.metrics) {
                (Some((l, _)), _) if let Ok((s, _)) = l.accept() => {
                    (Stream::Unix(s), Protocol::Control)
                }
                (_, Some(l)) if let Ok((s, _)) = l.accept() => (Stream::Tcp(s), Protocol::Http),
                _ => return,
            };
            let (stream, protocol) = accepted;
            let nonblocking = match &stream {
                Stream::Unix(s) => s.set_nonblocking(true),
                Stream::Tcp(s) => s.set_nonblocking(true),
            };
            if nonblocking.is_err() {
                continue;
            }
            self.next_id += 1;
            let mut client = Client {
                stream,
                protocol,
                request: Vec::new(),
                phase: Phase::Reading {
                    until: now + REQUEST_TIME,
                },
                id: self.next_id,
            };
            if self.clients.len() >= MAX_CLIENTS {
                // Told, not queued: the master's loop serves a bounded number.
                let reply = reply_bytes(protocol, 503, &error_reply("too many clients; try again"));
                let _ = client.stream.write(&reply);
                continue;
            }
            self.clients.push(client);
        }
    }
}

fn bind_metrics(addr: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        format!(
            "cannot listen for metrics on {addr}: {}",
            crate::errors::plain(&e)
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("metrics socket: {e}"))?;
    Ok(listener)
}

fn bind_control(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |e: io::Error| {
        format!(
            "cannot listen for control on {}: {}",
            path.display(),
            crate::errors::plain(&e)
        )
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "cannot listen for control on {}: a file that is not a socket is in the way",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "cannot listen for control on {}: another process answers there",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    // Created 0600 from the start (no window in which another user could connect).
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    Ok(listener)
}

/// Reads what the client sent; Some once the request is complete (or wrong).
fn read_request(client: &mut Client) -> io::Result<Option<Result<Request, String>>> {
    let mut buf = [0u8; 1024];
    loop {
        match client.stream.read(&mut buf) {
            Ok(0) => {
                // End of input: a command without its newline still counts.
                return Ok(Some(
                    complete(client, true).unwrap_or_else(|| Err("no request".to_string())),
                ));
            }
            Ok(n) => {
                client.request.extend_from_slice(&buf[..n]);
                if let Some(done) = complete(client, false) {
                    return Ok(Some(done));
                }
                if client.request.len() > MAX_REQUEST {
                    return Ok(Some(Err(format!(
                        "request longer than {MAX_REQUEST} bytes"
                    ))));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The request, once the bytes so far hold a whole one.
fn complete(client: &Client, ended: bool) -> Option<Result<Request, String>> {
    let text = &client.request;
    match client.protocol {
        Protocol::Control => {
            let end = text
                .iter()
                .position(|&b| b == b'\n')
                .or(ended.then_some(text.len()))?;
            let line = std::str::from_utf8(&text[..end])
                .map_err(|_| "the command is not UTF-8".to_string());
            Some(line.and_then(parse_command))
        }
        Protocol::Http => {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(text) {
                Ok(httparse::Status::Complete(_)) => Some(match (request.method, request.path) {
                    (Some("GET"), Some("/metrics")) => Ok(Request::Metrics),
                    (Some("GET"), Some("/livez")) => Ok(Request::Livez),
                    (Some("GET"), Some("/readyz")) => Ok(Request::Readyz),
                    (Some("GET"), Some(path)) => Err(format!(
                        "no such page {path}; try /metrics, /livez or /readyz"
                    )),
                    _ => Err("only GET /metrics, /livez and /readyz are served".to_string()),
                }),
                Ok(httparse::Status::Partial) if !ended => None,
                Ok(httparse::Status::Partial) => Some(Err("incomplete request".to_string())),
                Err(e) => Some(Err(format!("bad request: {e}"))),
            }
        }
    }
}

fn reply_bytes(protocol: Protocol, status: u16, body: &str) -> Vec<u8> {
    match protocol {
        Protocol::Control => format!("{body}\n").into_bytes(),
        Protocol::Http => {
            let reason = match status {
                200 => "OK",
                400 => "Bad Request",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let kind = if body.starts_with('{') {
                "application/json"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    }
}

/// The status of the server, as `raasd ctl status --json` prints it (documented in
/// raasd(8); fields are only ever added).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub master: MasterStatus,
    pub listeners: Vec<ListenerStatus>,
    pub workers: Vec<WorkerStatus>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize)]
pub struct MasterStatus {
    pub pid: u32,
    pub version: &'static str,
    /// Seconds since the epoch.
    pub started_at: u64,
    pub config_file: Option<String>,
    pub generation: u64,
    pub workers_target: usize,
    /// Current workers that beat in time (a late one is not counted).
    pub workers_accepting: usize,
    /// Current workers that have missed their heartbeat, not killed yet.
    pub workers_late: usize,
    /// `idle`, `waiting for the new master`, `handed over`, `stopping`.
    pub state: String,
    pub handover: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    pub address: String,
    /// Connections waiting in the accept queue (TCP only).
    pub queue: Option<u32>,
    pub backlog: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    pub state: &'static str,
    /// Seconds since the epoch.
    pub started_at: u64,
    /// Open now.
    pub connections: u64,
    pub requests: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub heartbeat_age_ms: u64,
    pub resident_bytes: Option<u64>,
    /// `seccomp`, `off`, `unavailable` or `pending` (see [`crate::sandbox::Confinement`]).
    pub sandbox: &'static str,
}

pub use crate::supervisor::Totals;

/// The Prometheus text exposition of `status`.
pub fn metrics(status: &Status) -> String {
    use std::fmt::Write as _;
    let t = &status.totals;
    let mut text = String::new();
    let mut put = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(text, "{name}{labels} {value}");
        }
    };
    put(
        "raasd_requests_total",
        "counter",
        "Lines answered since the master started.",
        vec![(String::new(), t.requests.to_string())],
    );
    put(
        "raasd_connections_accepted_total",
        "counter",
        "Connections accepted since the master started.",
        vec![(String::new(), t.connections_accepted.to_string())],
    );
    put(
        "raasd_bytes_received_total",
        "counter",
        "Bytes read from clients since the master started.",
        vec![(String::new(), t.bytes_received.to_string())],
    );
    put(
        "raasd_bytes_sent_total",
        "counter",
        "Bytes written to clients since the master started.",
        vec![(String::new(), t.bytes_sent.to_string())],
    );
    put(
        "raasd_worker_restarts_total",
        "counter",
        "Workers replaced since the master started, by reason.",
        t.restarts
            .iter()
            .map(|(reason, n)| {
                (
                    format!("{{reason=\"{}\"}}", label_value(reason)),
                    n.to_string(),
                )
            })
            .collect(),
    );
    put(
        "raasd_workers_target",
        "gauge",
        "Worker processes wanted.",
        vec![(String::new(), status.master.workers_target.to_string())],
    );
    put(
        "raasd_workers_accepting",
        "gauge",
        "Workers of the current generation accepting, beating in time.",
        vec![(String::new(), status.master.workers_accepting.to_string())],
    );
    put(
        "raasd_workers_late",
        "gauge",
        "Workers of the current generation that missed their heartbeat.",
        vec![(String::new(), status.master.workers_late.to_string())],
    );
    put(
        "raasd_generation",
        "gauge",
        "The current worker generation (raised by each reload and upgrade).",
        vec![(String::new(), status.master.generation.to_string())],
    );
    put(
        "raasd_start_time_seconds",
        "gauge",
        "When the master started, in seconds since the epoch.",
        vec![(String::new(), status.master.started_at.to_string())],
    );
    let listener = |l: &ListenerStatus| format!("{{listener=\"{}\"}}", escape(&l.address));
    put(
        "raasd_listen_queue_length",
        "gauge",
        "Connections waiting in a listen socket's accept queue.",
        status
            .listeners
            .iter()
            .filter_map(|l| Some((listener(l), l.queue?.to_string())))
            .collect(),
    );
    put(
        "raasd_listen_backlog",
        "gauge",
        "The accept queue's capacity.",
        status
            .listeners
            .iter()
            .filter_map(|l| Some((listener(l), l.backlog?.to_string())))
            .collect(),
    );
    let worker = |w: &WorkerStatus| {
        format!(
            "{{slot=\"{}\",generation=\"{}\",pid=\"{}\"}}",
            w.slot, w.generation, w.pid
        )
    };
    let per_worker = |f: &dyn Fn(&WorkerStatus) -> String| -> Vec<(String, String)> {
        status.workers.iter().map(|w| (worker(w), f(w))).collect()
    };
    put(
        "raasd_connections",
        "gauge",
        "Open client connections, per worker.",
        per_worker(&|w| w.connections.to_string()),
    );
    put(
        "raasd_worker_requests",
        "gauge",
        "Lines a worker has answered in its life.",
        per_worker(&|w| w.requests.to_string()),
    );
    put(
        "raasd_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since a worker's last heartbeat.",
        per_worker(&|w| format!("{:.3}", w.heartbeat_age_ms as f64 / 1000.0)),
    );
    put(
        "raasd_worker_resident_memory_bytes",
        "gauge",
        "A worker's resident memory.",
        status
            .workers
            .iter()
            .filter_map(|w| Some((worker(w), w.resident_bytes?.to_string())))
            .collect(),
    );
    text
}

/// A restart reason as a label value, in Prometheus's snake_case:
/// `killed by the master` is `killed_by_the_master`.
fn label_value(reason: &str) -> String {
    reason
        .chars()
        .filter_map(|c| match c {
            ' ' | '-' => Some('_'),
            c if c.is_ascii_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_say_what_exists() {
        assert_eq!(parse_command("status"), Ok(Request::Status));
        assert_eq!(parse_command("  workers 5 \r"), Ok(Request::Workers(5)));
        assert_eq!(
            parse_command("stop --quick"),
            Ok(Request::Stop { quick: true })
        );
        let err = parse_command("workers many").unwrap_err();
        assert!(err.contains("not a worker count"), "{err}");
        let err = parse_command("dance").unwrap_err();
        assert!(
            err.contains("unknown command 'dance'") && err.contains("reopen-logs"),
            "{err}"
        );
        assert!(parse_command("workers 99999").is_err());
    }

    #[test]
    fn restart_reasons_are_snake_case_label_values() {
        assert_eq!(label_value("killed by the master"), "killed_by_the_master");
        assert_eq!(
            label_value("killed by the kernel's OOM killer"),
            "killed_by_the_kernels_oom_killer"
        );
        assert_eq!(label_value("reload"), "reload");
    }
}
