//! A strict reader of the Prometheus text exposition format (version 0.0.4), for the
//! tests: it refuses anything the format does not allow, where the available crates
//! skip lines they cannot read (see DESIGN.md, "Crates"). `.ci/run` also feeds the same
//! exposition to Prometheus's own `promtool` and to the Python client.
//!
//! Checked: every line is a comment, a `# HELP`, a `# TYPE` or a sample; names and label
//! names have the allowed characters; label values are quoted with only `\\`, `\"` and
//! `\n` escapes; values are Go floats and timestamps integers; a family has at most one
//! HELP and one TYPE, the TYPE before its samples, and its samples in one run; no series
//! twice; the text ends with a newline.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name to its TYPE (`untyped` when none was given).
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The sum of every sample called `name` (None when there is none).
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut values = self.samples.iter().filter(|s| s.name == name).peekable();
        values.peek()?;
        Some(values.map(|s| s.value).sum())
    }

    /// The value of the sample `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

/// Parses `text`, or says which line breaks which rule.
pub fn parse(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut out = Exposition::default();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment
                .trim_start_matches([' ', '\t'])
                .splitn(3, [' ', '\t'])
                .collect();
            match words.first() {
                Some(&"HELP") | Some(&"TYPE") => {}
                _ => continue, // a plain comment
            }
            let name = words.get(1).copied().unwrap_or("");
            check_metric_name(name).map_err(at)?;
            let rest = words.get(2).copied().unwrap_or("");
            let family = name.to_string();
            if done.contains(&family) && current.as_deref() != Some(name) {
                return Err(at(format!("{name} is described after its samples ended")));
            }
            if words[0] == "HELP" {
                unescape(rest, false).map_err(at)?;
                if out.help.insert(family, rest.into()).is_some() {
                    return Err(at(format!("a second HELP for {name}")));
                }
            } else {
                let kind = rest.trim_end_matches([' ', '\t']);
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(at(format!("unknown type {kind:?}")));
                }
                if out
                    .samples
                    .iter()
                    .any(|s| family_of(&s.name, &out.types) == name)
                {
                    return Err(at(format!("the TYPE of {name} comes after its samples")));
                }
                if out.types.insert(family, kind.into()).is_some() {
                    return Err(at(format!("a second TYPE for {name}")));
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        let family = family_of(&sample.name, &out.types).to_string();
        let kind = out
            .types
            .get(&family)
            .map(String::as_str)
            .unwrap_or("untyped");
        if matches!(kind, "counter" | "gauge" | "untyped") && sample.name != family {
            return Err(at(format!("a {kind} sample must be named {family}")));
        }
        if current.as_deref() != Some(&family) {
            if done.contains(&family) {
                return Err(at(format!("the samples of {family} are not in one run")));
            }
            if let Some(previous) = current.take() {
                done.insert(previous);
            }
            current = Some(family.clone());
            done.insert(family.clone());
        }
        let key = (
            sample.name.clone(),
            sample.labels.clone().into_iter().collect(),
        );
        if !series.insert(key) {
            return Err(at("the same series twice".into()));
        }
        out.samples.push(sample);
    }
    for name in out.help.keys() {
        out.types
            .entry(name.clone())
            .or_insert_with(|| "untyped".into());
    }
    Ok(out)
}

/// The family a sample name belongs to: itself, or the histogram or summary it is a
/// `_bucket`, `_sum` or `_count` of.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        {
            return base;
        }
    }
    name
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a metric name"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with("__")
        && name
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a label name"))
    }
}

/// Undoes the escapes of a HELP text (`\\`, `\n`) or a label value (also `\"`).
fn unescape(s: &str, label_value: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if label_value => out.push('"'),
            other => return Err(format!("invalid escape \\{}", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

/// A Go float as Prometheus writes and reads it.
fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => return Ok(f64::NAN),
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let digits_ok = s
        .trim_start_matches(['+', '-'])
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '.');
    match s.parse::<f64>() {
        Ok(v) if digits_ok && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a value")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' ', '\t'])
        .ok_or("a sample without a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', '\t']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("a label without '='")?;
            let label = rest[..eq].trim_end_matches([' ', '\t']);
            check_label_name(label)?;
            rest = rest[eq + 1..].trim_start_matches([' ', '\t']);
            rest = rest
                .strip_prefix('"')
                .ok_or("a label value without quotes")?;
            let mut end = None;
            let mut escaped = false;
            for (i, c) in rest.char_indices() {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.ok_or("an unterminated label value")?;
            let value = unescape(&rest[..end], true)?;
            if labels.insert(label.to_string(), value).is_some() {
                return Err(format!("the label {label} twice"));
            }
            rest = rest[end + 1..].trim_start_matches([' ', '\t']);
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("labels not separated by ','".into());
            }
        }
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("no blank before the value".into());
    }
    let fields: Vec<&str> = rest.split([' ', '\t']).filter(|f| !f.is_empty()).collect();
    let value = match fields.as_slice() {
        [value] => parse_value(value)?,
        [value, timestamp] => {
            timestamp
                .parse::<i64>()
                .map_err(|_| format!("{timestamp:?} is not a timestamp"))?;
            parse_value(value)?
        }
        _ => return Err("a sample needs a value and at most a timestamp".into()),
    };
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}
