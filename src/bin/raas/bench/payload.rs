//! The benchmark's request lines and the exact reply each must get, computed once
//! with the library's own reversal so checking a reply is one comparison.

use raasd::codec::{Unit, reverse_into};

use crate::rng::Rng;

/// Text units of the `--unicode` mix. Several are one grapheme made of many code
/// points, which a reversal by code points would break apart.
const UNICODE_UNITS: &[&str] = &[
    "e\u{301}",                                                     // e + combining acute
    "a\u{308}\u{304}",                                              // a + two combining marks
    "\u{1F1EB}\u{1F1F7}",                                           // flag: France
    "\u{1F1EF}\u{1F1F5}",                                           // flag: Japan
    "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}\u{200D}\u{1F466}", // family, ZWJ
    "\u{1F469}\u{1F3FD}\u{200D}\u{1F4BB}",                          // technologist, skin tone, ZWJ
    "\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}",                           // rainbow flag, ZWJ
    "\u{915}\u{94D}\u{937}\u{93F}",                                 // Devanagari conjunct
    "\u{D55C}",                                                     // Hangul syllable
    "\u{1100}\u{1161}\u{11A8}",                                     // Hangul jamo sequence
    "\u{6F22}",                                                     // CJK ideograph
    "\u{E9}",                                                       // precomposed é
    "\u{3B1}",                                                      // Greek alpha
    "\u{5D0}",                                                      // Hebrew alef
    "\u{E01}\u{E33}",                                               // Thai with sara am
];

pub struct Payloads {
    /// Each request line with its `\n`.
    requests: Vec<Vec<u8>>,
    /// The reply to the request of the same index, with its `\n`.
    replies: Vec<Vec<u8>>,
}

impl Payloads {
    /// `count` distinct lines of exactly `len` bytes each.
    pub fn generate(count: usize, len: usize, unicode: bool, unit: Unit) -> Payloads {
        let mut rng = Rng::from_entropy(0x5eed);
        let mut requests = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(count);
        for _ in 0..count {
            let mut line = if unicode {
                unicode_line(&mut rng, len)
            } else {
                ascii_line(&mut rng, len)
            };
            let mut reply = Vec::with_capacity(len + 1);
            reverse_into(&line, unit, &mut reply);
            line.push(b'\n');
            reply.push(b'\n');
            requests.push(line);
            replies.push(reply);
        }
        Payloads { requests, replies }
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn request(&self, i: usize) -> &[u8] {
        &self.requests[i]
    }

    pub fn reply(&self, i: usize) -> &[u8] {
        &self.replies[i]
    }
}

/// Printable ASCII; no `\r`, so the reply always ends in a plain `\n`.
fn ascii_line(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| b' ' + rng.below(95) as u8).collect()
}

/// Mostly ASCII words with unicode units mixed in; padded with ASCII to exactly `len`
/// bytes, never splitting a unit.
fn unicode_line(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut line = Vec::with_capacity(len);
    while line.len() < len {
        let room = len - line.len();
        let unit = rng.pick(UNICODE_UNITS).as_bytes();
        if rng.below(3) == 0 && unit.len() <= room {
            line.extend_from_slice(unit);
        } else {
            line.push(b'a' + rng.below(26) as u8);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_length_asked_and_no_newline_inside() {
        for unicode in [false, true] {
            let p = Payloads::generate(50, 40, unicode, Unit::Graphemes);
            for i in 0..p.len() {
                let req = p.request(i);
                assert_eq!(req.len(), 41);
                assert_eq!(req.iter().filter(|&&b| b == b'\n' || b == b'\r').count(), 1);
                assert_eq!(p.reply(i).len(), 41);
                assert!(std::str::from_utf8(req).is_ok());
            }
        }
    }

    #[test]
    fn unicode_lines_hold_multi_codepoint_graphemes() {
        let p = Payloads::generate(20, 200, true, Unit::Graphemes);
        let by_chars = |i: usize| {
            let line = std::str::from_utf8(&p.request(i)[..200]).unwrap();
            let mut r: String = line.chars().rev().collect();
            r.push('\n');
            r.into_bytes()
        };
        // With multi-codepoint graphemes in every line, reversing by graphemes is
        // not reversing by chars.
        for i in 0..p.len() {
            assert_ne!(p.reply(i), by_chars(i), "line {i}");
        }
    }
}
