//! `raas [ADDR]`: stdin lines to the server, replies to stdout, in order, each exactly
//! once, at network speed and in bounded memory.
//!
//! Three threads share the [`Window`]: a stdin reader that adds lines (waiting while
//! the window is full), a sender per connection that writes the window's unsent
//! lines, and the main thread, which connects, reads replies, writes them to stdout
//! and reconnects with backoff when the connection is lost. A new connection starts
//! by sending again every line not yet answered, which is what the server expects of
//! a client whose connection it closed during a stop or a rotation.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::addr::{Addr, describe_connect_error};
use crate::backoff::Backoff;
use crate::window::{Mismatch, Send, Window};

/// Unanswered bytes in flight at most (plus one stdin chunk, or one longer line).
const WINDOW_BYTES: usize = 4 << 20;
/// Unanswered lines in flight at most, which bounds the window's bookkeeping for
/// inputs of tiny lines.
const WINDOW_LINES: usize = 128 * 1024;
const STDIN_CHUNK: usize = 64 * 1024;
const SEND_CHUNK: usize = 256 * 1024;
const RECV_BUFFER: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a connection ended.
enum Ended {
    /// Every line was answered and stdin is finished.
    Done,
    /// The connection went away; `made_progress` when it answered at least one line.
    Lost { why: String, made_progress: bool },
    /// Continuing cannot help (stdout failed, the server rejected a line).
    Fatal(String),
}

/// Runs the client; true when every reply was written.
pub fn run(addr: &Addr, retry_for: Duration) -> bool {
    let window = Arc::new(Window::new(WINDOW_BYTES, WINDOW_LINES));
    let input_failed = Arc::new(std::sync::OnceLock::new());
    {
        let window = window.clone();
        let input_failed = input_failed.clone();
        // Not joined: at the end it may still be blocked reading a terminal, and the
        // process exit takes care of it.
        thread::spawn(move || {
            if let Err(e) = read_stdin(&window) {
                let _ = input_failed.set(e.to_string());
            }
            window.finish_input();
        });
    }

    let mut client = Client {
        addr,
        window: &window,
        stdout: io::stdout().lock(),
        answered: 0,
        backoff: Backoff::new(retry_for),
        retry_for,
    };
    let ok = client.run();
    if let Some(err) = input_failed.get() {
        eprintln!("raas: reading stdin: {err}");
        return false;
    }
    ok
}

/// Reads stdin and pushes whole lines into the window; a last line without `\n` gets
/// one, so the server answers it like any other.
fn read_stdin(window: &Window) -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut carry: Vec<u8> = Vec::with_capacity(2 * STDIN_CHUNK);
    let mut chunk = vec![0u8; STDIN_CHUNK];
    loop {
        let n = match stdin.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        carry.extend_from_slice(&chunk[..n]);
        if let Some(last) = carry.iter().rposition(|&b| b == b'\n') {
            window.push(&carry[..=last]);
            carry.drain(..=last);
        }
    }
    if !carry.is_empty() {
        carry.push(b'\n');
        window.push(&carry);
    }
    Ok(())
}

struct Client<'a> {
    addr: &'a Addr,
    window: &'a Arc<Window>,
    stdout: io::StdoutLock<'static>,
    /// Lines answered so far, for messages.
    answered: u64,
    backoff: Backoff,
    retry_for: Duration,
}

impl Client<'_> {
    fn run(&mut self) -> bool {
        let mut was_lost = false;
        // Connect only when there is something to send: an idle terminal session
        // whose connection timed out reconnects when the next line is typed.
        while self.window.wait_for_work() {
            let socket = match self.addr.connect(CONNECT_TIMEOUT) {
                Ok(socket) => socket,
                Err(e) => {
                    if !self.retry_after(&describe_connect_error(self.addr, &e)) {
                        return false;
                    }
                    continue;
                }
            };
            if was_lost {
                eprintln!(
                    "raas: reconnected to {}, sending the {} unanswered lines again",
                    self.addr,
                    self.window.unanswered()
                );
            }
            match self.session(socket) {
                Ended::Done => break,
                Ended::Fatal(msg) => {
                    let _ = self.stdout.flush();
                    eprintln!("raas: {msg}");
                    return false;
                }
                Ended::Lost { why, made_progress } => {
                    let unanswered = self.window.unanswered();
                    was_lost = unanswered > 0;
                    if unanswered == 0 {
                        continue; // nothing lost; reconnect when there is work
                    }
                    let why = format!("{why} with {unanswered} lines unanswered");
                    if made_progress {
                        eprintln!("raas: {why}, reconnecting");
                    } else if !self.retry_after(&why) {
                        return false;
                    }
                }
            }
        }
        match self.stdout.flush() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("raas: writing stdout: {e}");
                false
            }
        }
    }

    /// After a failed attempt: says so, waits the backoff delay and returns true, or
    /// says it gives up and returns false.
    fn retry_after(&mut self, what: &str) -> bool {
        match self.backoff.failed(Instant::now()) {
            Some(delay) => {
                eprintln!("raas: {what}, retrying in {} ms", delay.as_millis());
                thread::sleep(delay);
                true
            }
            None => {
                eprintln!(
                    "raas: {what}; giving up after {:.0} s of retrying, {} lines unanswered",
                    self.retry_for.as_secs_f64(),
                    self.window.unanswered()
                );
                false
            }
        }
    }

    /// One connection: a sender thread writes, this thread reads replies.
    fn session(&mut self, socket: Socket) -> Ended {
        let sender_socket = match socket.try_clone() {
            Ok(s) => s,
            Err(e) => return Ended::Fatal(format!("duplicating the socket: {e}")),
        };
        let id = self.window.begin_session();
        let window = self.window.clone();
        let sender = thread::spawn(move || send_lines(&sender_socket, &window, id));
        let ended = self.receive(&socket);
        self.window.end_session();
        // Unblocks a sender stuck writing to a server that no longer reads.
        let _ = socket.shutdown(Shutdown::Both);
        let _ = sender.join();
        ended
    }

    fn receive(&mut self, mut socket: &Socket) -> Ended {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut filled = 0;
        let mut made_progress = false;
        loop {
            if filled == buf.len() {
                // One reply longer than the buffer: grow to hold it whole.
                buf.resize(buf.len() * 2, 0);
            }
            let n = match socket.read(&mut buf[filled..]) {
                Ok(0) => {
                    if self.window.finished() {
                        return Ended::Done;
                    }
                    if let Some(end) = buf[..filled].iter().position(|&b| b == b'\n') {
                        // Shorter than the line it answers: an error message, sent
                        // just before the server closed.
                        let err = String::from_utf8_lossy(&buf[..end]);
                        return Ended::Fatal(refused(self.answered, err.trim_end()));
                    }
                    return Ended::Lost {
                        why: format!("connection to {} closed by the server", self.addr),
                        made_progress,
                    };
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Ended::Lost {
                        why: format!("connection to {} lost ({e})", self.addr),
                        made_progress,
                    };
                }
            };
            filled += n;
            let taken = self.window.take_replies(&buf[..filled], self.answered);
            let used = taken.used;
            // The replies before a mismatch are good: out they go before the error.
            if used > 0 {
                if let Err(e) = self.stdout.write_all(&buf[..used]) {
                    return Ended::Fatal(format!("writing stdout: {e}"));
                }
                self.answered += taken.replies;
            }
            if taken.mismatch.is_some()
                && let Some(err) = server_error(&buf[used..filled])
            {
                return Ended::Fatal(refused(self.answered, &err));
            }
            match taken.mismatch {
                None => {}
                Some(Mismatch::WrongLength { number }) => {
                    return Ended::Fatal(format!(
                        "the reply to line {number} is not as long as the line: \
                         is {} a RAAS server?",
                        self.addr
                    ));
                }
                Some(Mismatch::Unsolicited) => {
                    return Ended::Fatal(format!(
                        "{} sent more replies than lines were sent: is it a RAAS server?",
                        self.addr
                    ));
                }
            }
            if used > 0 {
                buf.copy_within(used..filled, 0);
                filled -= used;
                if !made_progress {
                    made_progress = true;
                    self.backoff.succeeded();
                }
            }
            if self.window.finished() {
                return Ended::Done;
            }
        }
    }
}

/// The server's `ERR ...` reply at the start of `rest`, when there is one whole.
fn server_error(rest: &[u8]) -> Option<String> {
    let end = rest.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&rest[..end]);
    line.starts_with("ERR ")
        .then(|| line.trim_end().to_string())
}

/// What the user is told when the server answers line `answered + 1` with `err` and
/// closes: which line, what it said, and that the replies before it were written.
fn refused(answered: u64, err: &str) -> String {
    format!(
        "the server refused line {}: '{err}' (the {answered} replies before it are written)",
        answered + 1
    )
}

/// The sender of one session: writes whatever the window has unsent, then half-closes
/// once stdin is finished so the server answers the rest and closes.
fn send_lines(mut socket: &Socket, window: &Window, session: u64) {
    let mut buf = Vec::with_capacity(SEND_CHUNK);
    loop {
        match window.next_to_send(session, &mut buf, SEND_CHUNK) {
            Send::Data => {
                if socket.write_all(&buf).is_err() {
                    // The reader sees the same failure and reports it; make sure it
                    // is not left waiting for replies that cannot come.
                    let _ = socket.shutdown(Shutdown::Both);
                    return;
                }
            }
            Send::AllSent => {
                let _ = socket.shutdown(Shutdown::Write);
                return;
            }
            Send::Stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_err_reply_is_told_apart_from_a_wrong_length() {
        assert_eq!(
            server_error(b"ERR line too long (max 10 bytes)\r\nmore"),
            Some("ERR line too long (max 10 bytes)".to_string())
        );
        assert_eq!(server_error(b"ERR no newline yet"), None);
        assert_eq!(server_error(b"olleh\n"), None);
        assert_eq!(
            refused(1000, "ERR x"),
            "the server refused line 1001: 'ERR x' (the 1000 replies before it are written)"
        );
    }
}
