//! Fuzzes the RAAS codec: arbitrary bytes, split arbitrarily into feeds, under each
//! unit and a small or large line limit. Checks that nothing panics and that the
//! output and the result are exactly those of feeding everything at once (split
//! invariance), and that a reply only ever reorders the bytes of its line.

#![no_main]

use libfuzzer_sys::fuzz_target;
use raasd::codec::{Codec, Unit};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let unit = [Unit::Graphemes, Unit::Chars, Unit::Bytes][usize::from(data[0]) % 3];
    let max_line = match data[1] {
        0..=127 => usize::from(data[1] % 32),
        _ => 65536,
    };
    let seed = data[2];
    let input = &data[3..];

    let mut whole = Codec::new(unit, max_line);
    let mut expected = Vec::new();
    let expected_result = whole.feed(input, &mut expected).and_then(|()| whole.finish(&mut expected));

    let mut split = Codec::new(unit, max_line);
    let mut got = Vec::new();
    let mut rest = input;
    let mut step = usize::from(seed).max(1);
    let mut result = Ok(());
    while !rest.is_empty() && result.is_ok() {
        let n = step.min(rest.len());
        result = split.feed(&rest[..n], &mut got);
        rest = &rest[n..];
        step = (step * 7 + 3) % 61 + 1;
    }
    let result = result.and_then(|()| split.finish(&mut got));
    assert_eq!(result, expected_result);
    assert_eq!(got, expected);

    if expected_result.is_ok() {
        // Every reply is a permutation of its line's bytes.
        let mut sorted_in: Vec<u8> = input.iter().copied().filter(|&b| b != b'\n' && b != b'\r').collect();
        let mut sorted_out: Vec<u8> = got.iter().copied().filter(|&b| b != b'\n' && b != b'\r').collect();
        sorted_in.sort_unstable();
        sorted_out.sort_unstable();
        assert_eq!(sorted_in, sorted_out);
    }
});
