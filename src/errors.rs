//! Error wording shared by every module that reports a system error to the operator.
//!
//! Owns one rule: an `io::Error` reads as plain words — "address already in use", not
//! "Address already in use (os error 98)" — inside a message that names what failed
//! (`cannot listen on 127.0.0.1:2200: address already in use`). It depends on nothing
//! else in raasd, so every module can use it without an import cycle.

use std::io;

/// An io::Error in plain words: "address already in use", not
/// "Address already in use (os error 98)".
pub fn plain(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(cut) => &text[..cut],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_plain_words() {
        let e = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(plain(&e), "address already in use");
    }
}
