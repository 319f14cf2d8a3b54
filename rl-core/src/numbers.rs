//! Numbers as math answers write them and graders read them: `parse_number` (currency, commas,
//! units, `\\frac`, `x = 5`), the shortest text of a number (`canonical_number`), the tolerance
//! two answers are equal within (`same_number`), and the brace matching `\\boxed{}` extraction
//! needs.

/// The shortest text of a number: integers without a fraction (`18.00` -> `18`), others as Rust's
/// shortest round-trip form.
pub fn canonical_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// Reads a number as written in a math answer: surrounding `$`/`\$`, thousands commas, `%`, a
/// unit in `\text{..}` or after a space (`18 dollars`), `\frac{a}{b}` and `a/b`, a leading `x =`,
/// unicode minus, trailing `.`. Returns `None` when what is left is not a number.
pub fn parse_number(text: &str) -> Option<f64> {
    let mut s = text.trim().to_string();
    // `x = 5` or `\text{total} = 5`: the value is what follows the last `=`.
    if let Some((_, rhs)) = s.rsplit_once('=') {
        s = rhs.trim().to_string();
    }
    s = strip_text_commands(&s);
    for pat in [
        "\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "{,}", "\\left", "\\right",
    ] {
        s = s.replace(pat, "");
    }
    s = s.replace('\u{2212}', "-");
    let s = s.trim().trim_end_matches('.').trim();
    // Drop a trailing unit word: `18 dollars`, `5 apples`.
    let s = match s.split_once(char::is_whitespace) {
        Some((head, tail)) if tail.chars().all(|c| c.is_alphabetic() || c.is_whitespace()) => head,
        _ => s,
    };
    if let Some(v) = parse_fraction(s) {
        return Some(v);
    }
    parse_plain(s)
}

/// `-1,234.50` -> -1234.5; commas only as thousands separators (`1,2` is not a number).
fn parse_plain(s: &str) -> Option<f64> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() {
        return None;
    }
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    if int.contains(',') {
        let groups: Vec<&str> = int.split(',').collect();
        let ok = !groups[0].is_empty()
            && groups[0].len() <= 3
            && groups[1..].iter().all(|g| g.len() == 3);
        if !ok {
            return None;
        }
    }
    let int: String = int.chars().filter(|c| *c != ',').collect();
    let body_ok = int.chars().all(|c| c.is_ascii_digit())
        && frac.is_none_or(|f| f.chars().all(|c| c.is_ascii_digit()))
        && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()));
    if !body_ok {
        return None;
    }
    let joined = match frac {
        Some(f) if !f.is_empty() => format!("{}.{f}", if int.is_empty() { "0" } else { &int }),
        _ => int,
    };
    let v: f64 = joined.parse().ok()?;
    Some(if neg { -v } else { v })
}

/// `\frac{3}{4}`, `\dfrac{3}{4}`, `-\frac{3}{4}`, `3/4`.
fn parse_fraction(s: &str) -> Option<f64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, s),
    };
    let (num, den) = if let Some(rest) = body
        .strip_prefix("\\frac")
        .or_else(|| body.strip_prefix("\\dfrac"))
        .or_else(|| body.strip_prefix("\\tfrac"))
    {
        let rest = rest.trim_start().strip_prefix('{')?;
        let (num, rest) = rest.split_once('}')?;
        let rest = rest.trim_start().strip_prefix('{')?;
        let (den, tail) = rest.split_once('}')?;
        if !tail.trim().is_empty() {
            return None;
        }
        (num, den)
    } else {
        body.split_once('/')?
    };
    let (n, d) = (parse_plain(num)?, parse_plain(den)?);
    if d == 0.0 {
        return None;
    }
    let v = n / d;
    Some(if neg { -v } else { v })
}

/// Removes `\text{..}`, `\mathrm{..}`, `\textbf{..}` (and their content, a unit) and unwraps
/// `\mathbf{5}`/`{5}` around a bare number.
fn strip_text_commands(s: &str) -> String {
    let mut out = s.to_string();
    for cmd in ["\\text", "\\mathrm", "\\textbf", "\\mbox"] {
        while let Some(start) = out.find(&format!("{cmd}{{")) {
            let open = start + cmd.len();
            let Some(close) = matching_brace(&out, open) else {
                break;
            };
            let inner = out[open + 1..close].to_string();
            // A number inside `\text{}` is kept (`\text{18}`); a unit is dropped.
            let keep = if parse_plain(inner.trim()).is_some() {
                inner
            } else {
                String::new()
            };
            out.replace_range(start..=close, &keep);
        }
    }
    if let Some(inner) = out
        .trim()
        .strip_prefix("\\mathbf{")
        .and_then(|r| r.strip_suffix('}'))
    {
        out = inner.to_string();
    }
    let t = out.trim();
    if t.starts_with('{') && matching_brace(t, 0) == Some(t.len() - 1) {
        out = t[1..t.len() - 1].to_string();
    }
    out
}

/// Byte index of the `}` that closes the `{` at byte `open`.
pub(crate) fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether an answer value equals the gold one (relative 1e-6, absolute for values below 1).
pub fn same_number(answer: f64, gold: f64) -> bool {
    (answer - gold).abs() <= 1e-6 * gold.abs().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        for (s, v) in [
            ("1,000", Some(1000.0)),
            ("$18.00", Some(18.0)),
            ("\\$18.00", Some(18.0)),
            ("-3", Some(-3.0)),
            ("\u{2212}3", Some(-3.0)),
            ("0.5", Some(0.5)),
            (".5", Some(0.5)),
            ("5.", Some(5.0)),
            ("50%", Some(50.0)),
            ("\\frac{3}{4}", Some(0.75)),
            ("-\\dfrac{1}{2}", Some(-0.5)),
            ("3/4", Some(0.75)),
            ("18 \\text{ dollars}", Some(18.0)),
            ("18 dollars", Some(18.0)),
            ("x = 5", Some(5.0)),
            ("{42}", Some(42.0)),
            ("\\text{42}", Some(42.0)),
            ("1,2", None),
            ("12,34,567", None),
            ("five", None),
            ("", None),
            ("3/0", None),
            ("1.2.3", None),
            ("5 + 3", None),
        ] {
            assert_eq!(parse_number(s), v, "{s:?}");
        }
    }
}
