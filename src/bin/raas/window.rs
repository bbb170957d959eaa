//! The window of the pipe client: lines read from stdin whose replies have not been
//! written yet, shared by the stdin reader, the socket sender and the reply receiver.
//!
//! It is what makes restarts lossless: a line leaves the window only when its reply
//! has been taken, so after a reconnect the sender starts again from the first
//! unanswered line. It is also the memory bound: the stdin reader waits while the
//! window is full (a few MiB or lines), so a huge input streams through.
//!
//! A reply is exactly as long as its line (reversing permutes the bytes, and a line's
//! `\r\n` comes back as `\r\n`), which is how replies are matched to lines without
//! scanning them.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

pub struct Window {
    state: Mutex<State>,
    changed: Condvar,
    max_bytes: usize,
    max_lines: usize,
}

struct State {
    /// Unanswered lines, each with its `\n`, from `head` on; `..head` is answered and
    /// reclaimed lazily so that taking replies does not move memory each time.
    bytes: Vec<u8>,
    head: usize,
    /// The length (with `\n`) of each unanswered line, oldest first.
    lines: VecDeque<usize>,
    /// Index in `bytes` up to which the current session has sent.
    sent: usize,
    session: u64,
    session_open: bool,
    input_done: bool,
}

/// What the sender of a session should do next.
pub enum Send {
    /// Write these bytes (copied into the caller's buffer).
    Data,
    /// Everything was sent and stdin is finished: half-close the connection.
    AllSent,
    /// The session is over.
    Stop,
}

/// What [`Window::take_replies`] found at the start of the received bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    /// Bytes that are whole replies, to be written out.
    pub used: usize,
    /// How many replies that is.
    pub replies: u64,
    /// Why the bytes after `used` do not fit the next line, if they do not: the
    /// replies before it are good all the same.
    pub mismatch: Option<Mismatch>,
}

/// The reply stream does not fit the lines sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The reply to line `number` (1-based over the whole run) is not as long as it.
    WrongLength { number: u64 },
    /// A reply arrived for a line that was never sent.
    Unsolicited,
}

impl Window {
    pub fn new(max_bytes: usize, max_lines: usize) -> Window {
        Window {
            state: Mutex::new(State {
                bytes: Vec::new(),
                head: 0,
                lines: VecDeque::new(),
                sent: 0,
                session: 0,
                session_open: false,
                input_done: false,
            }),
            changed: Condvar::new(),
            max_bytes,
            max_lines,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread ends the process anyway; the data stays consistent
        // because every update completes under one lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Adds complete lines (`chunk` ends with `\n`), first waiting while the window is
    /// full. A window holding nothing takes any chunk, so a line longer than the
    /// window still goes through.
    pub fn push(&self, chunk: &[u8]) {
        debug_assert_eq!(chunk.last(), Some(&b'\n'));
        let mut st = self.lock();
        while !st.lines.is_empty()
            && (st.unanswered_bytes() + chunk.len() > self.max_bytes
                || st.lines.len() >= self.max_lines)
        {
            st = self.wait(st);
        }
        let mut start = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'\n' {
                st.lines.push_back(i + 1 - start);
                start = i + 1;
            }
        }
        st.bytes.extend_from_slice(chunk);
        drop(st);
        self.changed.notify_all();
    }

    /// Stdin is finished: no more lines will come.
    pub fn finish_input(&self) {
        self.lock().input_done = true;
        self.changed.notify_all();
    }

    /// Waits until there is a line to send or stdin is finished; false when every
    /// line has been answered and no more will come.
    pub fn wait_for_work(&self) -> bool {
        let mut st = self.lock();
        while st.lines.is_empty() && !st.input_done {
            st = self.wait(st);
        }
        !st.lines.is_empty()
    }

    pub fn finished(&self) -> bool {
        let st = self.lock();
        st.input_done && st.lines.is_empty()
    }

    pub fn unanswered(&self) -> usize {
        self.lock().lines.len()
    }

    /// Starts a session on a new connection: everything unanswered is to be sent again.
    pub fn begin_session(&self) -> u64 {
        let mut st = self.lock();
        st.session += 1;
        st.session_open = true;
        st.sent = st.head;
        st.session
    }

    /// Ends the session: its sender stops.
    pub fn end_session(&self) {
        self.lock().session_open = false;
        self.changed.notify_all();
    }

    /// For the sender of `session`: waits for bytes to send and copies up to `max` of
    /// them into `buf` (they count as sent).
    pub fn next_to_send(&self, session: u64, buf: &mut Vec<u8>, max: usize) -> Send {
        let mut st = self.lock();
        loop {
            if st.session != session || !st.session_open {
                return Send::Stop;
            }
            if st.sent < st.bytes.len() {
                let end = st.bytes.len().min(st.sent + max);
                buf.clear();
                buf.extend_from_slice(&st.bytes[st.sent..end]);
                st.sent = end;
                return Send::Data;
            }
            if st.input_done {
                return Send::AllSent;
            }
            st = self.wait(st);
        }
    }

    /// Takes the replies at the start of `data`, up to the first that does not fit
    /// its line. `answered_before` is the number of lines answered before, for
    /// messages.
    pub fn take_replies(&self, data: &[u8], answered_before: u64) -> Taken {
        let mut st = self.lock();
        let mut used = 0;
        let mut taken = 0u64;
        let mut mismatch = None;
        while let Some(&len) = st.lines.front() {
            if data.len() - used < len {
                break;
            }
            if data[used + len - 1] != b'\n' {
                mismatch = Some(Mismatch::WrongLength {
                    number: answered_before + taken + 1,
                });
                break;
            }
            if st.head + len > st.sent {
                mismatch = Some(Mismatch::Unsolicited);
                break;
            }
            st.lines.pop_front();
            st.head += len;
            used += len;
            taken += 1;
        }
        if mismatch.is_none() && st.lines.is_empty() && used < data.len() {
            mismatch = Some(Mismatch::Unsolicited);
        }
        st.reclaim();
        drop(st);
        if taken > 0 {
            self.changed.notify_all();
        }
        Taken {
            used,
            replies: taken,
            mismatch,
        }
    }
}

impl State {
    fn unanswered_bytes(&self) -> usize {
        self.bytes.len() - self.head
    }

    /// Drops answered bytes once they are the larger part, so the cost of moving the
    /// rest is amortised over the replies that freed them.
    fn reclaim(&mut self) {
        if self.head == self.bytes.len() {
            self.bytes.clear();
            self.sent = 0;
            self.head = 0;
        } else if self.head >= 64 * 1024 && self.head * 2 >= self.bytes.len() {
            let head = self.head;
            self.bytes.drain(..head);
            self.sent -= head;
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(used: usize, replies: u64, mismatch: Option<Mismatch>) -> Taken {
        Taken {
            used,
            replies,
            mismatch,
        }
    }

    fn send_all(w: &Window, session: u64) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        while let Send::Data = w.next_to_send(session, &mut buf, 4) {
            all.extend_from_slice(&buf);
        }
        all
    }

    #[test]
    fn replies_free_lines_and_resend_starts_at_the_first_unanswered() {
        let w = Window::new(1 << 20, 1000);
        w.push(b"ab\ncde\n");
        w.push(b"\n");
        w.finish_input();
        let s = w.begin_session();
        assert_eq!(send_all(&w, s), b"ab\ncde\n\n");
        // The first reply and half of the second arrive, then the connection drops.
        assert_eq!(w.take_replies(b"ba\ned", 0), taken(3, 1, None));
        assert_eq!(w.unanswered(), 2);
        w.end_session();
        let s = w.begin_session();
        assert_eq!(send_all(&w, s), b"cde\n\n");
        assert_eq!(w.take_replies(b"edc\n\n", 1), taken(5, 2, None));
        assert!(w.finished());
        assert!(!w.wait_for_work());
    }

    #[test]
    fn wrong_lengths_and_unsolicited_replies_are_caught() {
        let w = Window::new(1 << 20, 1000);
        w.push(b"abc\nd\n");
        let s = w.begin_session();
        let mut buf = Vec::new();
        assert!(matches!(w.next_to_send(s, &mut buf, 100), Send::Data));
        assert_eq!(
            w.take_replies(b"ERR x\n", 7),
            taken(0, 0, Some(Mismatch::WrongLength { number: 8 }))
        );
        assert_eq!(w.take_replies(b"cba\nd\n", 0), taken(6, 2, None));
        assert_eq!(
            w.take_replies(b"x\n", 2),
            taken(0, 0, Some(Mismatch::Unsolicited))
        );
    }

    #[test]
    fn the_replies_before_a_mismatch_are_taken() {
        let w = Window::new(1 << 20, 1000);
        w.push(b"ab\n12345678901\n");
        let s = w.begin_session();
        let mut buf = Vec::new();
        assert!(matches!(w.next_to_send(s, &mut buf, 100), Send::Data));
        assert_eq!(
            w.take_replies(b"ba\nERR line too long (max 10 bytes)\n", 0),
            taken(3, 1, Some(Mismatch::WrongLength { number: 2 }))
        );
        assert_eq!(w.unanswered(), 1);
    }

    #[test]
    fn replies_to_unsent_lines_are_refused() {
        let w = Window::new(1 << 20, 1000);
        w.push(b"a\nb\n");
        let s = w.begin_session();
        let mut buf = Vec::new();
        assert!(matches!(w.next_to_send(s, &mut buf, 2), Send::Data));
        assert_eq!(
            w.take_replies(b"a\nb\n", 0),
            taken(2, 1, Some(Mismatch::Unsolicited))
        );
    }

    #[test]
    fn a_full_window_blocks_the_reader_until_replies_come() {
        let w = std::sync::Arc::new(Window::new(4, 1000));
        w.push(b"abc\n");
        let w2 = w.clone();
        let pusher = std::thread::spawn(move || w2.push(b"de\n"));
        let s = w.begin_session();
        let mut buf = Vec::new();
        assert!(matches!(w.next_to_send(s, &mut buf, 100), Send::Data));
        assert_eq!(buf, b"abc\n");
        assert_eq!(w.take_replies(b"cba\n", 0), taken(4, 1, None));
        pusher.join().unwrap();
        assert_eq!(w.unanswered(), 1);
    }
}
