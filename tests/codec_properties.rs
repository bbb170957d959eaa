//! Property tests for the RAAS codec: split invariance, agreement with a
//! naive model of the protocol, and the algebra of reversal.

use proptest::prelude::*;
use raasd::codec::{Codec, Unit, reverse_into};
use unicode_segmentation::UnicodeSegmentation;

fn unit() -> impl Strategy<Value = Unit> {
    prop_oneof![Just(Unit::Graphemes), Just(Unit::Chars), Just(Unit::Bytes)]
}

/// Pieces that make the interesting cases likely: terminators, interior
/// `\r`, combining marks, ZWJ and regional indicators, truncated and
/// invalid sequences, NUL.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(b"\n".to_vec()),
        2 => Just(b"\r".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        4 => proptest::collection::vec(b'a'..=b'z', 1..4),
        2 => Just("é".as_bytes().to_vec()),
        1 => Just("e\u{301}".as_bytes().to_vec()),
        1 => Just("\u{301}".as_bytes().to_vec()),
        2 => Just("🇫🇷".as_bytes().to_vec()),
        1 => Just("🇫".as_bytes().to_vec()),
        1 => Just("👨\u{200d}👩\u{200d}👧".as_bytes().to_vec()),
        1 => Just("\u{200d}".as_bytes().to_vec()),
        1 => Just("한".as_bytes().to_vec()),
        1 => Just(vec![0xff]),
        1 => Just(vec![0xe2, 0x82]),
        1 => Just(vec![0x80]),
        1 => Just(vec![0]),
        2 => any::<u8>().prop_map(|b| vec![b]),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(piece(), 0..40).prop_map(|pieces| pieces.concat())
}

/// Valid UTF-8 built from the same kind of pieces, for grapheme checks.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z\r ]{1,3}",
        Just("é".to_string()),
        Just("e\u{301}".to_string()),
        Just("\u{301}".to_string()),
        Just("🇫🇷".to_string()),
        Just("🇫".to_string()),
        Just("👨\u{200d}👩\u{200d}👧".to_string()),
        Just("\u{200d}".to_string()),
        Just("한".to_string()),
        Just("\u{1100}\u{1161}".to_string()),
        any::<char>()
            .prop_filter("no newline", |&c| c != '\n')
            .prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..20).prop_map(|pieces| pieces.concat())
}

fn max_line() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..64, 1 => 64usize..4096, 1 => Just(usize::MAX)]
}

/// Cuts `input` at the given (unsorted, possibly repeated) positions.
fn chunks(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for cut in cuts {
        pieces.push(input[from..cut].to_vec());
        from = cut;
    }
    pieces.push(input[from..].to_vec());
    pieces
}

type Outcome = (Vec<u8>, Result<(), String>);

fn run_chunks(unit: Unit, max: usize, pieces: &[Vec<u8>], finish: bool) -> Outcome {
    let mut codec = Codec::new(unit, max);
    let mut out = Vec::new();
    let mut result = Ok(());
    for piece in pieces {
        result = codec.feed(piece, &mut out);
        assert!(codec.pending_len() <= max);
        if result.is_err() {
            break;
        }
    }
    if finish && result.is_ok() {
        result = codec.finish(&mut out);
    }
    (out, result.map_err(|e| e.to_string()))
}

/// Naive, allocation-happy statement of the whole protocol.
fn model(unit: Unit, max: usize, input: &[u8], finish: bool) -> Outcome {
    let mut out = Vec::new();
    let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    let tail = lines.pop().unwrap_or_default();
    let err = format!("line too long (max {max} bytes)");
    for line in lines {
        if line.len() > max {
            out.extend_from_slice(format!("ERR {err}\n").as_bytes());
            return (out, Err(err));
        }
        out.extend(model_reply(unit, line));
    }
    if tail.len() > max {
        out.extend_from_slice(format!("ERR {err}\n").as_bytes());
        return (out, Err(err));
    }
    if finish && !tail.is_empty() {
        out.extend(model_reply(unit, tail));
    }
    (out, Ok(()))
}

fn model_reply(unit: Unit, line: &[u8]) -> Vec<u8> {
    let (body, end): (&[u8], &[u8]) = match line.strip_suffix(b"\r") {
        Some(body) => (body, b"\r\n"),
        None => (line, b"\n"),
    };
    let mut units: Vec<&[u8]> = Vec::new();
    for chunk in body.utf8_chunks() {
        let valid = chunk.valid();
        match unit {
            Unit::Graphemes => units.extend(valid.graphemes(true).map(str::as_bytes)),
            Unit::Chars => units.extend(
                valid
                    .char_indices()
                    .map(|(i, c)| &valid.as_bytes()[i..i + c.len_utf8()]),
            ),
            Unit::Bytes => units.extend(valid.as_bytes().chunks(1)),
        }
        units.extend(chunk.invalid().chunks(1));
    }
    units.reverse();
    let mut reply = units.concat();
    reply.extend_from_slice(end);
    reply
}

fn rev(line: &[u8], unit: Unit) -> Vec<u8> {
    let mut out = Vec::new();
    reverse_into(line, unit, &mut out);
    out
}

proptest! {
    #[test]
    fn split_invariance(
        input in bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        unit in unit(),
        max in max_line(),
        finish in any::<bool>(),
    ) {
        let whole = run_chunks(unit, max, std::slice::from_ref(&input), finish);
        let split = run_chunks(unit, max, &chunks(&input, &cuts), finish);
        prop_assert_eq!(&split, &whole);
        // Byte-at-a-time is the most extreme split.
        let singles: Vec<Vec<u8>> = input.iter().map(|&b| vec![b]).collect();
        prop_assert_eq!(run_chunks(unit, max, &singles, finish), whole);
    }

    #[test]
    fn codec_agrees_with_model(
        input in bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        unit in unit(),
        max in max_line(),
        finish in any::<bool>(),
    ) {
        let got = run_chunks(unit, max, &chunks(&input, &cuts), finish);
        prop_assert_eq!(got, model(unit, max, &input, finish));
    }

    #[test]
    fn one_reply_per_newline(
        input in bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        unit in unit(),
    ) {
        let (out, result) = run_chunks(unit, usize::MAX, &chunks(&input, &cuts), false);
        prop_assert!(result.is_ok());
        let count = |bytes: &[u8]| bytes.iter().filter(|&&b| b == b'\n').count();
        prop_assert_eq!(count(&out), count(&input));
        // Replies are as long as the lines they answer.
        let answered = input.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        prop_assert_eq!(out.len(), answered);
    }

    #[test]
    fn bytes_reversal_is_an_involution(
        line in bytes().prop_map(|mut b| { b.retain(|&x| x != b'\n'); b }),
    ) {
        prop_assert_eq!(rev(&rev(&line, Unit::Bytes), Unit::Bytes), line);
    }

    #[test]
    fn chars_reversal_is_an_involution_on_text(line in text()) {
        // Only for valid UTF-8: reversed invalid bytes can turn valid
        // (b"\xe2\x82\xc2" reverses to b"\xc2\x82\xe2", which starts with
        // U+0082), so on arbitrary bytes the second pass sees other units.
        prop_assert_eq!(rev(&rev(line.as_bytes(), Unit::Chars), Unit::Chars), line.into_bytes());
    }

    #[test]
    fn graphemes_reversal_permutes_clusters(line in text()) {
        // The output is exactly the input's clusters in reverse order, so the
        // multiset of clusters is preserved. Twice is not always the identity:
        // reversal can change segmentation (a leading combining mark attaches
        // to what used to precede it), so the involution is only checked when
        // the output segments into the same clusters.
        let out = rev(line.as_bytes(), Unit::Graphemes);
        let mut clusters: Vec<&str> = line.graphemes(true).collect();
        clusters.reverse();
        prop_assert_eq!(&out, &clusters.concat().into_bytes());
        let out = String::from_utf8(out).expect("valid UTF-8 stays valid");
        if out.graphemes(true).eq(clusters.iter().copied()) {
            prop_assert_eq!(rev(out.as_bytes(), Unit::Graphemes), line.into_bytes());
        }
    }

    #[test]
    fn reversal_permutes_bytes(
        line in bytes().prop_map(|mut b| { b.retain(|&x| x != b'\n'); b }),
        unit in unit(),
    ) {
        let out = rev(&line, unit);
        let mut sorted_in = line;
        sorted_in.sort_unstable();
        let mut sorted_out = out;
        sorted_out.sort_unstable();
        prop_assert_eq!(sorted_in, sorted_out);
    }
}
