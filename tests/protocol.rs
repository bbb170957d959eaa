//! The RAAS line protocol over real sockets: units, line endings, invalid UTF-8, the
//! line limit, the idle timeout, half-close, and unix listeners.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Starts a one-worker server on an ephemeral port with extra options.
fn server(extra: &[&str]) -> Server {
    let mut args = vec!["-w", "1", "-l", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Sends raw bytes, half-closes, and returns everything the server wrote up to EOF.
fn exchange(s: &Server, request: &[u8]) -> Vec<u8> {
    let mut c = LineClient::connect(s.addr()).expect("connect");
    c.send(request).expect("send");
    c.shutdown_write();
    c.read_to_eof().expect("reading to EOF")
}

#[test]
fn graphemes_are_the_default_unit() {
    let s = server(&[]);
    let mut c = LineClient::connect(s.addr()).expect("connect");
    assert_eq!(c.roundtrip("hello"), "olleh");
    // A flag (two regional indicators) and e + combining acute stay whole.
    assert_eq!(c.roundtrip("🇫🇷e\u{301}x"), "xe\u{301}🇫🇷");
    // A ZWJ family emoji and a Hangul syllable made of jamo are single graphemes.
    let family = "👨\u{200d}👩\u{200d}👧";
    let hangul = "\u{1100}\u{1161}\u{11a8}";
    let line = format!("a{family}b{hangul}c");
    let want = format!("c{hangul}b{family}a");
    assert_eq!(c.roundtrip(&line), want);
    assert_eq!(reverse_graphemes(&line), want, "the test oracle agrees");
    // The connection is persistent: many more requests on it.
    for i in 0..50 {
        let line = format!("request {i}: ñandú 🇯🇵");
        assert_eq!(c.roundtrip(&line), reverse_graphemes(&line));
    }
}

#[test]
fn unit_chars_reverses_scalar_values() {
    let s = server(&["--unit", "chars"]);
    let mut c = LineClient::connect(s.addr()).expect("connect");
    assert_eq!(c.roundtrip("hello"), "olleh");
    // The combining accent now lands before the letter it followed.
    assert_eq!(c.roundtrip("e\u{301}x"), "x\u{301}e");
    // The two regional indicators of a flag are swapped: FR becomes RF.
    assert_eq!(c.roundtrip("🇫🇷"), "🇷🇫");
    assert_eq!(c.roundtrip("añb"), "bña");
}

#[test]
fn unit_bytes_reverses_bytes() {
    let s = server(&["--unit", "bytes"]);
    // "abé": é is C3 A9, so its bytes are swapped too.
    let reply = exchange(&s, "ab\u{e9}\n".as_bytes());
    assert_eq!(reply, b"\xa9\xc3ba\n");
    let reply = exchange(&s, b"xyz\r\n");
    assert_eq!(reply, b"zyx\r\n");
}

#[test]
fn line_endings_crlf_and_lf() {
    let s = server(&[]);
    let reply = exchange(&s, b"abc\r\ndef\nghi\r\n");
    assert_eq!(String::from_utf8_lossy(&reply), "cba\r\nfed\nihg\r\n");
    // Only a trailing CR is stripped; one inside the line is reversed like a character.
    let reply = exchange(&s, b"a\rb\n");
    assert_eq!(reply, b"b\ra\n");
}

#[test]
fn empty_lines_get_empty_replies() {
    let s = server(&[]);
    let reply = exchange(&s, b"\n\r\nx\n\n");
    assert_eq!(reply, b"\n\r\nx\n\n");
}

#[test]
fn invalid_utf8_is_reversed_byte_by_byte_and_never_fails() {
    let s = server(&[]);
    // Invalid bytes are units of their own; valid characters around them stay whole.
    let reply = exchange(&s, b"a\xffb\xc3\n");
    assert_eq!(reply, b"\xc3b\xffa\n");
    let reply = exchange(&s, b"\xe9t\xc3\xa9\n");
    assert_eq!(reply, b"\xc3\xa9t\xe9\n");
    // The connection survives invalid input: a valid line after it is still answered.
    let reply = exchange(&s, b"\xff\xfe\nok\n");
    assert_eq!(reply, b"\xfe\xff\nko\n");
}

#[test]
fn lines_up_to_max_line_are_answered() {
    let s = server(&["--max-line", "16"]);
    let line16 = "0123456789abcdef";
    let reply = exchange(&s, format!("{line16}\n").as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("{}\n", reverse_ascii(line16))
    );
}

#[test]
fn a_line_over_max_line_gets_err_and_the_connection_closes() {
    let s = server(&["--max-line", "16"]);
    let mut c = LineClient::connect(s.addr()).expect("connect");
    // A good line first, then one 17 bytes long: the first is answered, then ERR.
    c.send(b"ok\n0123456789abcdefg\n").expect("send");
    assert_eq!(c.read_line(), "ko");
    assert_eq!(c.read_line(), "ERR line too long (max 16 bytes)");
    c.expect_eof();
}

#[test]
fn an_overlong_line_without_newline_gets_err_without_waiting_for_the_newline() {
    let s = server(&["--max-line", "16"]);
    let mut c = LineClient::connect(s.addr()).expect("connect");
    // 40 bytes and no newline: the server must not wait for one (or buffer forever).
    c.send(&[b'x'; 40]).expect("send");
    assert_eq!(c.read_line(), "ERR line too long (max 16 bytes)");
    c.expect_eof();
}

#[test]
fn a_long_line_under_a_big_limit_is_answered_whole() {
    let s = server(&["--max-line", "200000"]);
    let line: String = (0..150_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut c = LineClient::connect(s.addr()).expect("connect");
    assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
    // Right at the default limit (65536 bytes) on a default server.
    let s = server(&[]);
    let line = "z".repeat(65535) + "A";
    let mut c = LineClient::connect(s.addr()).expect("connect");
    assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let s = server(&["--idle-timeout", "1"]);
    let mut c = LineClient::connect(s.addr()).expect("connect");
    assert_eq!(c.roundtrip("still here"), "ereh llits");
    let silent_since = Instant::now();
    // Blocks (read timeout 10 s) until the server closes.
    c.expect_eof();
    let idle = silent_since.elapsed();
    assert!(
        idle >= Duration::from_millis(900),
        "closed after {idle:?} of silence, before the 1 s idle timeout"
    );
    assert!(
        idle < Duration::from_secs(4),
        "closed only after {idle:?} of silence with --idle-timeout 1"
    );
}

#[test]
fn an_active_connection_outlives_the_idle_timeout() {
    let s = server(&["--idle-timeout", "1"]);
    let mut c = LineClient::connect(s.addr()).expect("connect");
    let start = Instant::now();
    let mut i = 0;
    // Talk every 300 ms (pacing, not synchronisation) for 2.5 s: never idle for 1 s.
    while start.elapsed() < Duration::from_millis(2500) {
        let line = format!("ping {i}");
        assert_eq!(c.roundtrip(&line), reverse_ascii(&line));
        i += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(i >= 5);
}

#[test]
fn half_close_gets_every_owed_reply_then_eof() {
    let s = server(&[]);
    // 1000 pipelined lines then a final unterminated one, then the write side closes.
    let mut request = Vec::new();
    let mut want = Vec::new();
    for i in 0..1000 {
        let line = format!("line number {i:04}");
        request.extend_from_slice(line.as_bytes());
        request.push(b'\n');
        want.extend_from_slice(reverse_ascii(&line).as_bytes());
        want.push(b'\n');
    }
    request.extend_from_slice(b"last, no newline");
    want.extend_from_slice(b"enilwen on ,tsal\n");
    let reply = exchange(&s, &request);
    assert_eq!(reply.len(), want.len(), "reply length");
    assert!(reply == want, "replies differ from the expected ones");
}

#[test]
fn half_close_answers_a_lone_unterminated_line() {
    let s = server(&[]);
    assert_eq!(exchange(&s, b"abc"), b"cba\n");
    assert_eq!(exchange(&s, b""), b"");
}

#[test]
fn two_tcp_listeners_are_both_served() {
    let s = Server::start(&["-w", "2", "-l", "127.0.0.1:0", "-l", "127.0.0.1:0"]);
    s.wait_for_log_nth("listening on ", 2, SOON);
    let addrs: Vec<std::net::SocketAddr> = s
        .listen_addrs()
        .iter()
        .map(|a| a.parse().expect("a TCP address"))
        .collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert_ne!(addrs[0], addrs[1]);
    for (i, addr) in addrs.iter().enumerate() {
        for j in 0..10 {
            let line = format!("listener {i} request {j}");
            assert_eq!(roundtrip(*addr, &line), reverse_ascii(&line), "via {addr}");
        }
    }
}

#[test]
fn a_unix_listener_is_served_and_its_file_removed_after_a_graceful_stop() {
    let path = temp_path("unix.sock");
    let _cleanup = RemoveOnDrop(path.clone());
    let listen = format!("unix:{}", path.display());
    let s = Server::start(&["-w", "2", "-l", &listen]);
    s.wait_for_log(&format!("listening on {listen}"), SOON);
    s.wait_for_log("all 2 workers accepting", SOON);
    assert!(exists(&path), "the socket file {} exists", path.display());
    for i in 0..20 {
        let stream = UnixStream::connect(&path).expect("connect to the unix socket");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut c = LineClient::new(stream);
        let line = format!("over unix {i} ✓");
        assert_eq!(c.roundtrip(&line), reverse_graphemes(&line));
    }
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(SOON);
    assert_eq!(status.code(), Some(0), "exit status after TERM: {status:?}");
    assert!(
        !exists(&path),
        "the socket file {} is still there after a graceful stop",
        path.display()
    );
    let err = UnixStream::connect(&path).expect_err("nobody listens any more");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::NotFound | ErrorKind::ConnectionRefused
        ),
        "{err}"
    );
}

/// The kernel timer of the server's side of the TCP connection from `client`
/// (`tr:when` of /proc/net/tcp: 2 is the keepalive timer, `when` in clock ticks).
fn server_side_timer(server: SocketAddr, client: SocketAddr) -> Option<(u32, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != local || f[2] != remote {
            return None;
        }
        let (tr, when) = f[5].split_once(':')?;
        Some((
            u32::from_str_radix(tr, 16).ok()?,
            u64::from_str_radix(when, 16).ok()?,
        ))
    })
}

#[test]
fn accepted_connections_have_tcp_keepalive_unless_it_is_off() {
    for (keepalive, want_timer) in [("7", true), ("0", false)] {
        let s = Server::start(&["-w", "1", "-l", "127.0.0.1:0", "--tcp-keepalive", keepalive]);
        let addr = s.addr();
        let mut c = LineClient::connect(addr).expect("connect");
        assert_eq!(c.roundtrip("alive?"), "?evila");
        let me = c.stream().local_addr().unwrap();
        let (tr, when) = server_side_timer(addr, me).expect("the server's socket in /proc/net/tcp");
        if want_timer {
            assert_eq!(
                tr, 2,
                "--tcp-keepalive {keepalive}: no keepalive timer (tr {tr})"
            );
            assert!(
                when <= 7 * 100 + 100,
                "--tcp-keepalive {keepalive}: the timer fires in {when} ticks"
            );
        } else {
            assert_eq!(
                tr, 0,
                "--tcp-keepalive 0: a timer runs (tr {tr}, when {when})"
            );
        }
    }
}

#[test]
fn the_access_log_has_a_line_per_closed_connection_with_why_it_ended() {
    let dir = temp_path("access");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    let log = dir.join("access.log");
    let s = Server::start(&[
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "--max-line",
        "10",
        "--access-log",
        log.to_str().unwrap(),
    ]);
    let addr = s.addr();
    // One that talks and closes; one whose line is too long.
    let replies = send_lines(addr, &["abc".to_string(), "de".to_string()]);
    assert_eq!(replies, vec!["cba", "ed"]);
    let mut long = LineClient::connect(addr).expect("connect");
    long.send_line("far too long a line").unwrap();
    let _ = long.read_to_eof();
    drop(long);
    let mut text = String::new();
    wait_until("two access log lines", SOON, || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().count() >= 2
    });
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains(" requests=2 bytes_received=7 bytes_sent=7 end=\"client closed\""),
        "{text}"
    );
    assert!(
        lines[0].contains("worker[0] pid=") && lines[0].contains(" peer=127.0.0.1:"),
        "{text}"
    );
    assert!(
        lines[1].contains(" requests=0 ") && lines[1].contains("end=\"line too long\""),
        "{text}"
    );
}
