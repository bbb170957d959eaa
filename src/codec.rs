//! The RAAS line protocol, as a pure bytes-in/bytes-out state machine.
//!
//! This module owns everything that decides *what* bytes go back to a client:
//! framing requests on `\n`, the CRLF rule (a trailing `\r` is stripped and the
//! reply then ends in `\r\n`), reversing a line by the configured [`Unit`]
//! (grapheme clusters, scalar values or bytes, with each invalid UTF-8 byte
//! being a unit of its own), and the line-length limit with its terminal
//! `ERR` reply. It does not own sockets, reading or writing buffers to file
//! descriptors, timeouts or logging: callers hand it whatever bytes arrived and
//! ship whatever it appended to `out`.
//!
//! Invariant (split invariance): feeding an input in any split into chunks
//! produces exactly the same concatenated output and the same final result as
//! feeding it in one call, including when the line-length limit is hit.

use std::fmt;
use std::str::FromStr;

use unicode_segmentation::UnicodeSegmentation;

/// What a line is reversed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Extended grapheme clusters (UAX #29), so flags and combining accents stay intact.
    Graphemes,
    /// Unicode scalar values.
    Chars,
    /// Raw bytes.
    Bytes,
}

impl Unit {
    /// The name accepted by [`Unit::from_str`].
    pub fn name(self) -> &'static str {
        match self {
            Unit::Graphemes => "graphemes",
            Unit::Chars => "chars",
            Unit::Bytes => "bytes",
        }
    }
}

impl FromStr for Unit {
    type Err = String;

    fn from_str(s: &str) -> Result<Unit, String> {
        match s {
            "graphemes" => Ok(Unit::Graphemes),
            "chars" => Ok(Unit::Chars),
            "bytes" => Ok(Unit::Bytes),
            other => Err(format!(
                "unknown unit '{other}' (expected graphemes, chars or bytes)"
            )),
        }
    }
}

/// More than `max` bytes arrived without a `\n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineTooLong {
    pub max: usize,
}

impl fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line too long (max {} bytes)", self.max)
    }
}

impl std::error::Error for LineTooLong {}

/// Per-connection protocol state: the unit, the limit, and the bytes of a
/// line whose `\n` has not arrived yet.
#[derive(Debug)]
pub struct Codec {
    unit: Unit,
    max_line: usize,
    // Only ever holds a line that straddles `feed` calls; never longer than
    // `max_line`, because the limit is checked before anything is stashed.
    partial: Vec<u8>,
    poisoned: bool,
    replies: u64,
}

/// Smallest allocation for `partial`, so short pipelined fragments do not
/// reallocate byte by byte.
const MIN_PARTIAL_CAPACITY: usize = 64;

impl Codec {
    pub fn new(unit: Unit, max_line: usize) -> Codec {
        Codec {
            unit,
            max_line,
            partial: Vec::new(),
            poisoned: false,
            replies: 0,
        }
    }

    /// Appends to `out` a reply for every complete line in `input` (after any buffered partial line).
    ///
    /// On [`LineTooLong`] the replies for the lines before the offending one
    /// and then `ERR line too long (max N bytes)\n` have been appended; the
    /// codec stays poisoned and every later call appends nothing and returns
    /// the same error.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), LineTooLong> {
        if self.poisoned {
            return Err(self.error());
        }
        // A reply is exactly as long as the line plus its `\n` (a stripped
        // `\r` comes back in `\r\n`), so this is one reservation for the call.
        out.reserve(self.partial.len() + input.len());

        let mut rest = input;
        if !self.partial.is_empty() {
            let room = self.max_line - self.partial.len();
            match find_newline(rest, room) {
                Some(i) => {
                    self.partial.extend_from_slice(&rest[..i]);
                    reply_into(&self.partial, self.unit, out);
                    self.replies += 1;
                    self.partial.clear();
                    rest = &rest[i + 1..];
                }
                None if rest.len() > room => return Err(self.poison(out)),
                None => {
                    self.stash(rest);
                    return Ok(());
                }
            }
        }

        // Lines wholly inside `input` are reversed straight from it; only the
        // unterminated tail is copied.
        loop {
            match find_newline(rest, self.max_line) {
                Some(i) => {
                    reply_into(&rest[..i], self.unit, out);
                    self.replies += 1;
                    rest = &rest[i + 1..];
                }
                None if rest.len() > self.max_line => return Err(self.poison(out)),
                None => {
                    self.stash(rest);
                    return Ok(());
                }
            }
        }
    }

    /// Input ended: answer a pending unterminated line.
    ///
    /// The pending line is treated as if a `\n` had followed it; an empty one
    /// produces nothing. Feeding may continue afterwards as on a fresh line.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), LineTooLong> {
        if self.poisoned {
            return Err(self.error());
        }
        if !self.partial.is_empty() {
            reply_into(&self.partial, self.unit, out);
            self.replies += 1;
            self.partial.clear();
        }
        Ok(())
    }

    /// Lines answered so far (the ERR reply is not one).
    pub fn replies(&self) -> u64 {
        self.replies
    }

    /// Bytes of an incomplete line buffered (0 when none).
    pub fn pending_len(&self) -> usize {
        self.partial.len()
    }

    /// The incomplete line buffered, to travel with a connection handed over.
    pub fn pending(&self) -> &[u8] {
        &self.partial
    }

    /// Whether a line was too long: the conversation is over.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Changes the unit for every line not yet answered, including a pending one.
    pub fn set_unit(&mut self, unit: Unit) {
        self.unit = unit;
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }

    fn error(&self) -> LineTooLong {
        LineTooLong { max: self.max_line }
    }

    fn poison(&mut self, out: &mut Vec<u8>) -> LineTooLong {
        let err = self.error();
        out.extend_from_slice(format!("ERR {err}\n").as_bytes());
        self.poisoned = true;
        // Nothing will ever be answered again, so the buffered bytes are dead.
        self.partial = Vec::new();
        err
    }

    /// Buffers an unterminated tail already known to fit within `max_line`.
    fn stash(&mut self, tail: &[u8]) {
        let needed = self.partial.len() + tail.len();
        if needed > self.partial.capacity() {
            // Amortised doubling, but capped at the limit so the buffer never
            // holds more than `max_line` bytes of capacity for a hostile client.
            let target = needed
                .max(self.partial.capacity().saturating_mul(2))
                .max(MIN_PARTIAL_CAPACITY)
                .min(self.max_line);
            self.partial.reserve_exact(target - self.partial.len());
        }
        self.partial.extend_from_slice(tail);
    }
}

/// Position of the first `\n` among the first `room + 1` bytes. Looking no
/// further is enough to decide the limit, and keeps a flood without newlines
/// from being scanned past the point where it is already an error.
fn find_newline(bytes: &[u8], room: usize) -> Option<usize> {
    let window = &bytes[..bytes.len().min(room.saturating_add(1))];
    memchr::memchr(b'\n', window)
}

/// Appends the reply to one line (its `\n` already removed).
fn reply_into(line: &[u8], unit: Unit, out: &mut Vec<u8>) {
    match line.strip_suffix(b"\r") {
        Some(body) => {
            reverse_into(body, unit, out);
            out.extend_from_slice(b"\r\n");
        }
        None => {
            reverse_into(line, unit, out);
            out.push(b'\n');
        }
    }
}

/// Appends `line` (no terminator) reversed by `unit` to `out`.
///
/// Never fails: each byte that is not part of valid UTF-8 is a unit of its
/// own, valid runs between them are split by `unit`, and the whole sequence
/// of units is reversed.
pub fn reverse_into(line: &[u8], unit: Unit, out: &mut Vec<u8>) {
    let start = out.len();
    // In ASCII every unit is one byte: the only multi-byte ASCII grapheme is
    // `\r\n`, which cannot occur inside a line.
    if unit == Unit::Bytes || line.is_ascii() {
        out.extend_from_slice(line);
        out[start..].reverse();
        return;
    }
    out.resize(start + line.len(), 0);
    let dst = &mut out[start..];

    // Units are laid down from the end of `dst` backwards, so the reversal
    // needs no intermediate list of units.
    let mut end = dst.len();
    let mut put = |unit_bytes: &[u8]| {
        let begin = end - unit_bytes.len();
        dst[begin..end].copy_from_slice(unit_bytes);
        end = begin;
    };
    for chunk in line.utf8_chunks() {
        let valid = chunk.valid();
        match unit {
            Unit::Graphemes => valid.graphemes(true).for_each(|g| put(g.as_bytes())),
            Unit::Chars => {
                let bytes = valid.as_bytes();
                for (i, c) in valid.char_indices() {
                    put(&bytes[i..i + c.len_utf8()]);
                }
            }
            Unit::Bytes => unreachable!("handled by the byte fast path"),
        }
        for byte in chunk.invalid() {
            put(std::slice::from_ref(byte));
        }
    }
    debug_assert_eq!(end, 0, "units must tile the line exactly");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Unit; 3] = [Unit::Graphemes, Unit::Chars, Unit::Bytes];

    fn rev(line: &[u8], unit: Unit) -> Vec<u8> {
        let mut out = Vec::new();
        reverse_into(line, unit, &mut out);
        out
    }

    /// Feeds `input` in one call, then finishes; returns output and both results.
    fn run(unit: Unit, max: usize, input: &[u8]) -> (Vec<u8>, Result<(), LineTooLong>) {
        let mut codec = Codec::new(unit, max);
        let mut out = Vec::new();
        let fed = codec.feed(input, &mut out);
        let finished = codec.finish(&mut out);
        if fed.is_err() {
            assert_eq!(finished, fed);
        }
        (out, finished)
    }

    fn feed_all(unit: Unit, max: usize, input: &[u8]) -> (Vec<u8>, Result<(), LineTooLong>) {
        let mut codec = Codec::new(unit, max);
        let mut out = Vec::new();
        let res = codec.feed(input, &mut out);
        (out, res)
    }

    #[test]
    fn unit_names_round_trip() {
        for unit in ALL {
            assert_eq!(unit.name().parse::<Unit>(), Ok(unit));
        }
        assert_eq!(
            "words".parse::<Unit>(),
            Err("unknown unit 'words' (expected graphemes, chars or bytes)".to_string())
        );
        assert!("Bytes".parse::<Unit>().is_err());
        assert!("".parse::<Unit>().is_err());
    }

    #[test]
    fn error_display() {
        assert_eq!(
            LineTooLong { max: 17 }.to_string(),
            "line too long (max 17 bytes)"
        );
    }

    #[test]
    fn ascii_is_the_same_for_every_unit() {
        for unit in ALL {
            assert_eq!(rev(b"hello, world", unit), b"dlrow ,olleh");
            assert_eq!(rev(b"", unit), b"");
            assert_eq!(rev(b"x", unit), b"x");
        }
    }

    #[test]
    fn flag_and_combining_accent() {
        let line = "🇫🇷e\u{301}".as_bytes();
        assert_eq!(rev(line, Unit::Graphemes), "e\u{301}🇫🇷".as_bytes());
        assert_eq!(rev(line, Unit::Chars), "\u{301}e🇷🇫".as_bytes());
        let mut bytes = line.to_vec();
        bytes.reverse();
        assert_eq!(rev(line, Unit::Bytes), bytes);
    }

    #[test]
    fn precomposed_and_mixed_text() {
        let line = "aé🇫🇷b".as_bytes();
        assert_eq!(rev(line, Unit::Graphemes), "b🇫🇷éa".as_bytes());
        assert_eq!(rev(line, Unit::Chars), "b🇷🇫éa".as_bytes());
    }

    #[test]
    fn family_emoji_zwj_sequence() {
        let family = "👨\u{200d}👩\u{200d}👧\u{200d}👦";
        let line = format!("x{family}y");
        assert_eq!(
            rev(line.as_bytes(), Unit::Graphemes),
            format!("y{family}x").as_bytes()
        );
        let chars: String = line.chars().rev().collect();
        assert_eq!(rev(line.as_bytes(), Unit::Chars), chars.as_bytes());
    }

    #[test]
    fn invalid_utf8_bytes_are_units() {
        // Invalid bytes around and between multibyte text; a truncated
        // sequence (\xe2\x82) counts as invalid bytes too.
        let line = b"a\xffb\xfe\xc3\xa9\xe2\x82c";
        assert_eq!(rev(line, Unit::Graphemes), b"c\x82\xe2\xc3\xa9\xfeb\xffa");
        assert_eq!(rev(line, Unit::Chars), b"c\x82\xe2\xc3\xa9\xfeb\xffa");
        assert_eq!(rev(line, Unit::Bytes), b"c\x82\xe2\xa9\xc3\xfeb\xffa");
        // Invalid bytes split grapheme runs: the accent cannot rejoin the e.
        let line = b"e\xff\xcc\x81";
        assert_eq!(rev(line, Unit::Graphemes), b"\xcc\x81\xffe");
        // Reversed invalid bytes may become valid, so reversing by chars
        // twice is not the identity on invalid input.
        assert_eq!(rev(b"\xe2\x82\xc2", Unit::Chars), b"\xc2\x82\xe2");
        assert_eq!(rev(b"\xc2\x82\xe2", Unit::Chars), b"\xe2\xc2\x82");
    }

    #[test]
    fn nul_bytes_are_ordinary() {
        for unit in ALL {
            let (out, res) = run(unit, 64, b"a\0b\0\n\0\n");
            assert_eq!(res, Ok(()));
            assert_eq!(out, b"\0b\0a\n\0\n");
        }
        assert_eq!(rev("\0é".as_bytes(), Unit::Chars), "é\0".as_bytes());
    }

    #[test]
    fn lf_and_crlf_terminators() {
        for unit in ALL {
            assert_eq!(feed_all(unit, 64, b"abc\n").0, b"cba\n");
            assert_eq!(feed_all(unit, 64, b"abc\r\n").0, b"cba\r\n");
        }
        let (out, _) = feed_all(Unit::Graphemes, 64, "🇫🇷é\r\n".as_bytes());
        assert_eq!(out, "é🇫🇷\r\n".as_bytes());
    }

    #[test]
    fn empty_and_lone_cr_lines() {
        for unit in ALL {
            assert_eq!(feed_all(unit, 64, b"\n"), (b"\n".to_vec(), Ok(())));
            assert_eq!(feed_all(unit, 64, b"\r\n"), (b"\r\n".to_vec(), Ok(())));
            // Only the last `\r` is the terminator's.
            assert_eq!(feed_all(unit, 64, b"\r\r\n").0, b"\r\r\n");
        }
    }

    #[test]
    fn interior_cr_is_ordinary() {
        for unit in ALL {
            assert_eq!(feed_all(unit, 64, b"a\rb\n").0, b"b\ra\n");
            assert_eq!(feed_all(unit, 64, b"\rab\r\n").0, b"ba\r\r\n");
        }
        assert_eq!(
            feed_all(Unit::Graphemes, 64, "\ré\u{301}\n".as_bytes()).0,
            "é\u{301}\r\n".as_bytes()
        );
    }

    #[test]
    fn many_lines_in_one_feed() {
        let (out, res) = feed_all(Unit::Chars, 16, b"one\ntwo\r\n\nthree\nfour");
        assert_eq!(res, Ok(()));
        assert_eq!(out, b"eno\nowt\r\n\neerht\n");
        let mut codec = Codec::new(Unit::Chars, 16);
        let mut out = Vec::new();
        codec.feed(b"one\ntwo\nfour", &mut out).unwrap();
        assert_eq!(codec.pending_len(), 4);
    }

    #[test]
    fn pipelined_partial_lines_across_feeds() {
        let mut codec = Codec::new(Unit::Graphemes, 64);
        let mut out = Vec::new();
        let flag = "🇫🇷".as_bytes();
        codec.feed(b"ab", &mut out).unwrap();
        assert_eq!((out.len(), codec.pending_len()), (0, 2));
        // Split inside the flag and between the `\r` and the `\n`.
        codec.feed(&flag[..3], &mut out).unwrap();
        codec.feed(&flag[3..], &mut out).unwrap();
        codec.feed(b"c\r", &mut out).unwrap();
        assert!(out.is_empty());
        codec.feed(b"\nxy\nz", &mut out).unwrap();
        assert_eq!(out, "c🇫🇷ba\r\nyx\n".as_bytes());
        assert_eq!(codec.pending_len(), 1);
        codec.feed(b"\n", &mut out).unwrap();
        assert_eq!(out, "c🇫🇷ba\r\nyx\nz\n".as_bytes());
        assert_eq!(codec.pending_len(), 0);
    }

    #[test]
    fn set_unit_applies_to_later_lines() {
        let mut codec = Codec::new(Unit::Bytes, 64);
        assert_eq!(codec.unit(), Unit::Bytes);
        let mut out = Vec::new();
        codec.feed("é\n".as_bytes(), &mut out).unwrap();
        codec.set_unit(Unit::Chars);
        assert_eq!(codec.unit(), Unit::Chars);
        codec.feed("é\n".as_bytes(), &mut out).unwrap();
        assert_eq!(out, b"\xa9\xc3\n\xc3\xa9\n");
    }

    #[test]
    fn exactly_max_is_accepted() {
        for unit in ALL {
            assert_eq!(feed_all(unit, 3, b"abc\n"), (b"cba\n".to_vec(), Ok(())));
            // The trailing `\r` counts towards the limit.
            assert_eq!(feed_all(unit, 3, b"ab\r\n"), (b"ba\r\n".to_vec(), Ok(())));
            assert_eq!(feed_all(unit, 0, b"\n\n").0, b"\n\n");
        }
    }

    #[test]
    fn max_plus_one_is_rejected_after_earlier_replies() {
        let err = LineTooLong { max: 3 };
        for unit in ALL {
            let (out, res) = feed_all(unit, 3, b"ab\nabcd\nxy\n");
            assert_eq!(res, Err(err));
            assert_eq!(out, b"ba\nERR line too long (max 3 bytes)\n");
            let (out, res) = feed_all(unit, 3, b"abc\r\n");
            assert_eq!(res, Err(err));
            assert_eq!(out, b"ERR line too long (max 3 bytes)\n");
        }
        assert_eq!(
            feed_all(Unit::Bytes, 0, b"\nx").0,
            b"\nERR line too long (max 0 bytes)\n"
        );
    }

    #[test]
    fn poisoned_after_error() {
        let err = LineTooLong { max: 2 };
        let mut codec = Codec::new(Unit::Chars, 2);
        let mut out = Vec::new();
        assert_eq!(codec.feed(b"abc", &mut out), Err(err));
        let after_error = out.len();
        assert_eq!(codec.feed(b"\nok\n", &mut out), Err(err));
        assert_eq!(codec.feed(b"", &mut out), Err(err));
        assert_eq!(codec.finish(&mut out), Err(err));
        assert_eq!(out.len(), after_error);
        assert_eq!(codec.pending_len(), 0);
    }

    #[test]
    fn error_detected_before_newline() {
        let mut codec = Codec::new(Unit::Bytes, 4);
        let mut out = Vec::new();
        codec.feed(b"ok\n12", &mut out).unwrap();
        codec.feed(b"34", &mut out).unwrap();
        assert_eq!(codec.pending_len(), 4);
        assert_eq!(codec.feed(b"5", &mut out), Err(LineTooLong { max: 4 }));
        assert_eq!(out, b"ko\nERR line too long (max 4 bytes)\n");
        // Same within a single chunk that never contains a newline.
        let (out, res) = feed_all(Unit::Bytes, 4, &[b'x'; 1000]);
        assert_eq!(res, Err(LineTooLong { max: 4 }));
        assert_eq!(out, b"ERR line too long (max 4 bytes)\n");
    }

    #[test]
    fn finish_answers_pending_line() {
        for unit in ALL {
            assert_eq!(run(unit, 64, b"a\nbc"), (b"a\ncb\n".to_vec(), Ok(())));
            assert_eq!(run(unit, 64, b"a\nbc\r"), (b"a\ncb\r\n".to_vec(), Ok(())));
            assert_eq!(run(unit, 64, b"\r"), (b"\r\n".to_vec(), Ok(())));
            assert_eq!(run(unit, 64, b"a\n"), (b"a\n".to_vec(), Ok(())));
            assert_eq!(run(unit, 64, b""), (Vec::new(), Ok(())));
        }
        let mut codec = Codec::new(Unit::Chars, 64);
        let mut out = Vec::new();
        codec.feed(b"xy", &mut out).unwrap();
        codec.finish(&mut out).unwrap();
        assert_eq!(codec.pending_len(), 0);
        // A second finish has nothing left to answer.
        codec.finish(&mut out).unwrap();
        assert_eq!(out, b"yx\n");
    }

    #[test]
    fn pending_never_exceeds_max_line() {
        let max = 100;
        let mut codec = Codec::new(Unit::Graphemes, max);
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            let res = codec.feed("é".as_bytes(), &mut out);
            fed += 2;
            assert!(codec.pending_len() <= max);
            assert!(codec.partial.capacity() <= max);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(fed, max + 2);
        assert!(out.starts_with(b"ERR "));
    }
}
