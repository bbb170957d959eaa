//! The man pages: each documents every long option its program's `--help` prints (and
//! `raas`'s every subcommand).
//!
//! That they render with groff without a single warning is checked by `.ci/run`, which
//! installs groff: `cargo test` needs nothing that cargo does not fetch.

use std::path::{Path, PathBuf};
use std::process::Command;

const RAASD_PAGE: &str = "man/raasd.8";
const RAAS_PAGE: &str = "man/raas.1";

fn page_path(page: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(page)
}

/// The page's source with roff's escaped dashes (`\-`) as plain dashes and without
/// font changes or zero-width escapes, so that `\fB\-\-max\-line\fR` is found as
/// `--max-line`.
fn page_text(page: &str) -> String {
    let path = page_path(page);
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    plain_roff(&source)
}

/// `\-` becomes `-`; `\fX`, `\f(XX`, `\f[...]`, `\&` and `\%` go.
fn plain_roff(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at + 1..];
        rest = if let Some(after) = escape.strip_prefix('\\') {
            out.push_str("\\\\");
            after
        } else if let Some(after) = escape.strip_prefix('-') {
            out.push('-');
            after
        } else if let Some(after) = escape.strip_prefix(['&', '%']) {
            after
        } else if let Some(font) = escape.strip_prefix('f') {
            if let Some(name) = font.strip_prefix('(') {
                name.get(2..).unwrap_or("")
            } else if let Some(name) = font.strip_prefix('[') {
                name.find(']').map_or("", |end| &name[end + 1..])
            } else {
                font.chars().next().map_or("", |c| &font[c.len_utf8()..])
            }
        } else {
            out.push('\\');
            escape
        };
    }
    out.push_str(rest);
    out
}

/// Runs `program args...` and returns its standard output, which must be a success.
fn help_of(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env("COLUMNS", "100")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// Every `--long-option` in `text`: a `--` not inside a word, then `[a-z-]+`.
fn long_flags(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut flags = Vec::new();
    let mut i = 0;
    while i + 2 < bytes.len() {
        let starts_flag = bytes[i] == b'-'
            && bytes[i + 1] == b'-'
            && bytes[i + 2].is_ascii_lowercase()
            && (i == 0 || !is_flag_byte(bytes[i - 1]));
        if !starts_flag {
            i += 1;
            continue;
        }
        let start = i;
        i += 2;
        while i < bytes.len() && (bytes[i].is_ascii_lowercase() || bytes[i] == b'-') {
            i += 1;
        }
        let flag = text[start..i].trim_end_matches('-').to_string();
        if !flags.contains(&flag) {
            flags.push(flag);
        }
    }
    flags
}

fn is_flag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Whether `flag` occurs in `text` as a whole option: `--max-requests` is not found
/// inside `--max-requests-jitter`.
fn mentions_flag(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(at, _)| {
        let before = text[..at].bytes().next_back();
        let after = text[at + flag.len()..].bytes().next();
        !before.is_some_and(is_flag_byte) && !after.is_some_and(is_flag_byte)
    })
}

/// Subcommand names listed under `Commands:` in a clap help text (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

fn assert_documents_flags(page: &str, help: &str, source: &str) {
    let text = page_text(page);
    let flags = long_flags(help);
    assert!(
        flags.iter().any(|f| f == "--help"),
        "no long options found in `{source}`:\n{help}"
    );
    let missing: Vec<&String> = flags
        .iter()
        .filter(|flag| !mentions_flag(&text, flag))
        .collect();
    assert!(
        missing.is_empty(),
        "{page} does not document these options of `{source}`: {missing:?}"
    );
}

#[test]
fn flag_scanner_finds_whole_options() {
    let help =
        "  -w, --workers <N>\n      --max-requests-jitter <J>\n  x--y, a --b-\n --max-line\n";
    assert_eq!(
        long_flags(help),
        ["--workers", "--max-requests-jitter", "--b", "--max-line"]
    );
    assert!(mentions_flag(
        ".B --max-requests-jitter",
        "--max-requests-jitter"
    ));
    assert!(!mentions_flag(".B --max-requests-jitter", "--max-requests"));
    let roff =
        plain_roff(".BI \\-\\-max\\-line \\fB\\-\\-max\\-requests\\fR, \\f(CWbench\\fP x\\e");
    assert_eq!(roff, ".BI --max-line --max-requests, bench x\\e");
    assert!(mentions_flag(&roff, "--max-requests"));
    assert!(mentions_flag(&roff, "bench"));
}

/// The widest line of `text`, in characters.
fn widest(text: &str) -> usize {
    text.lines().map(|l| l.chars().count()).max().unwrap_or(0)
}

/// `raasd -h` fits a phone's terminal (24 lines of 80 columns, as Unicorn's does),
/// lists only real options and ends with where the rest is; every help is 80 wide;
/// the helps and the SYNOPSIS name `raasd ctl`.
#[test]
fn help_fits_80_by_24_and_says_where_the_rest_is() {
    let raasd = env!("CARGO_BIN_EXE_raasd");
    let raas = env!("CARGO_BIN_EXE_raas");
    let short = help_of(raasd, &["-h"]);
    let long = help_of(raasd, &["--help"]);
    assert!(short.starts_with("raasd: "), "{short}");
    assert!(
        short.lines().count() <= 24,
        "raasd -h is {} lines:\n{short}",
        short.lines().count()
    );
    assert!(
        widest(&short) <= 80,
        "raasd -h is {} wide:\n{short}",
        widest(&short)
    );
    let tail: String = short.lines().rev().take(3).collect::<Vec<_>>().join("\n");
    assert!(
        tail.contains("--help") && tail.contains("man 8 raasd"),
        "raasd -h must end with where the rest is:\n{short}"
    );
    for flag in long_flags(&short) {
        assert!(
            mentions_flag(&long, &flag),
            "raasd -h lists {flag}, which --help lacks"
        );
    }
    assert!(
        short.contains("raasd ctl") && long.contains("raasd ctl"),
        "{short}\n{long}"
    );
    for (program, args) in [
        (raasd, &["--help"][..]),
        (raasd, &["ctl", "--help"][..]),
        (raas, &["-h"][..]),
        (raas, &["--help"][..]),
        (raas, &["bench", "-h"][..]),
        (raas, &["bench", "--help"][..]),
    ] {
        let help = help_of(program, args);
        assert!(
            widest(&help) <= 80,
            "{program} {args:?} is {} wide:\n{help}",
            widest(&help)
        );
    }
    assert!(help_of(raasd, &["ctl", "--help"]).contains("Usage: raasd ctl"));
    let synopsis = page_text(RAASD_PAGE);
    let synopsis = &synopsis
        [synopsis.find(".SH SYNOPSIS").unwrap()..synopsis.find(".SH DESCRIPTION").unwrap()];
    assert!(synopsis.contains("raasd ctl"), "{synopsis}");
}

#[test]
fn raasd_page_documents_every_option() {
    let help = help_of(env!("CARGO_BIN_EXE_raasd"), &["--help"]);
    assert_documents_flags(RAASD_PAGE, &help, "raasd --help");
}

#[test]
fn raas_page_documents_every_option_and_subcommand() {
    let raas = env!("CARGO_BIN_EXE_raas");
    let help = help_of(raas, &["--help"]);
    assert_documents_flags(RAAS_PAGE, &help, "raas --help");
    let text = page_text(RAAS_PAGE);
    let commands = subcommands(&help);
    assert!(
        commands.iter().any(|c| c == "bench"),
        "`raas --help` lists no bench subcommand:\n{help}"
    );
    for command in commands {
        assert!(
            mentions_flag(&text, &command),
            "{RAAS_PAGE} does not document the subcommand `raas {command}`"
        );
        let sub_help = help_of(raas, &[&command, "--help"]);
        assert_documents_flags(RAAS_PAGE, &sub_help, &format!("raas {command} --help"));
    }
}

/// raasd(8) and the README say that `examples/raasd.toml` lists every key with its
/// default: each line `raasd --check-config` prints is in it (an unset key as a
/// commented example), and it sets no key that raasd does not print.
#[test]
fn example_config_lists_every_key_with_its_default() {
    let output = Command::new(env!("CARGO_BIN_EXE_raasd"))
        .arg("--check-config")
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run raasd --check-config");
    assert!(
        output.status.success(),
        "raasd --check-config: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).expect("--check-config prints UTF-8");
    let example_path = page_path("examples/raasd.toml");
    let example = std::fs::read_to_string(&example_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", example_path.display()));
    let example_lines: Vec<&str> = example.lines().map(str::trim_end).collect();

    let mut printed_keys = Vec::new();
    for line in printed.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        if let Some(key) = line
            .strip_prefix("# ")
            .and_then(|rest| rest.strip_suffix(" = (not set)"))
        {
            let commented = format!("# {key} = ");
            assert!(
                example_lines.iter().any(|l| l.starts_with(&commented)),
                "examples/raasd.toml lacks the unset key '{key}' as a commented line \
                 '{commented}...' (raasd --check-config prints '{line}')"
            );
            printed_keys.push(key.to_string());
        } else if let Some((key, _)) = line.split_once(" = ") {
            assert!(
                example_lines.contains(&line),
                "examples/raasd.toml lacks key '{key}' with its default: raasd --check-config \
                 prints '{line}'"
            );
            printed_keys.push(key.to_string());
        } else {
            panic!("unexpected line in raasd --check-config output: '{line}'");
        }
    }
    for line in &example_lines {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        assert!(
            printed_keys.iter().any(|k| k == key),
            "examples/raasd.toml sets key '{key}', which raasd --check-config does not print"
        );
    }
}

/// raasd(8)'s CONFIGURATION FILE block is examples/raasd.toml without its comments:
/// every key line, set or commented out, in the same order.
#[test]
fn the_pages_config_block_is_the_example_file_without_comments() {
    let example = std::fs::read_to_string(page_path("examples/raasd.toml")).unwrap();
    let is_key_line = |l: &&str| {
        let l = l.strip_prefix("# ").unwrap_or(l);
        l.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
    };
    let want: Vec<&str> = example.lines().filter(is_key_line).collect();
    let page = page_text(RAASD_PAGE);
    let start = page
        .find("Without its comments, it reads:")
        .expect("the CONFIGURATION FILE block");
    let block = &page[start..];
    let block = &block[block.find(".EX\n").unwrap() + 4..block.find(".EE").unwrap()];
    let got: Vec<String> = block.lines().map(|l| l.replace("\\e", "\\")).collect();
    assert_eq!(
        got, want,
        "raasd(8)'s block differs from examples/raasd.toml"
    );
}
