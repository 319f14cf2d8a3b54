//! Rewards: each a small pure function of a completion's text (and whether it finished on its own
//! or was truncated), combined with weights from the config. The value of every component is kept
//! beside the weighted total, so the store and the metrics can show what moved.
//!
//! Kinds (config names):
//! - `tapeagents`: +1 correct, 0 wrong, -1 when no answer can be parsed or the output was truncated.
//! - `strict_format` (0.5): the whole completion is `<think>\n..\n</think>\n<answer>\n..\n</answer>`
//!   with exactly those line breaks (the notebooks' regex, with `.` matching newlines as intended).
//! - `soft_format` (0.5): the completion starts with a think block followed by an answer block.
//! - `xml_count` (up to 0.5): 0.125 for each of the four tags appearing once with its newlines,
//!   minus 0.001 per character after the closing answer tag (the notebooks' `count_xml`).
//! - `integer_answer` (0.5): the extracted answer is an integer (`-?[0-9]+`).
//! - `correctness`: partial credit: 3.0 exact, 1.5 within 10%, 0.5 within 20%, -0.5 wrong, 0 when
//!   there is no numeric answer.
//! - `number_match` (1.5): the first number in the answer section equals the gold answer.
//! - `equations` (0..1): the fraction of `@@@@ a op b = c @@@@` steps that are arithmetically right.
//!
//! The answer is the content of the last `\boxed{..}` (boxed style) or of the answer tag (tag
//! styles; a missing closing tag reads to the end, as the notebooks' split does).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::numbers::{matching_brace, parse_number, same_number};
use crate::prompts::{PromptStyle, Tags};
use crate::tasks::Gold;

/// A reward component, as named in the config's `rewards:` map.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum RewardKind {
    Tapeagents,
    StrictFormat,
    SoftFormat,
    XmlCount,
    IntegerAnswer,
    Correctness,
    NumberMatch,
    Equations,
}

impl RewardKind {
    pub const ALL: [RewardKind; 8] = [
        RewardKind::Tapeagents,
        RewardKind::StrictFormat,
        RewardKind::SoftFormat,
        RewardKind::XmlCount,
        RewardKind::IntegerAnswer,
        RewardKind::Correctness,
        RewardKind::NumberMatch,
        RewardKind::Equations,
    ];

    /// The name the config uses (the serde name, derived by the same rule).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Whether the kind is about tags, and so meaningless with the boxed style.
    pub fn needs_tags(self) -> bool {
        matches!(
            self,
            RewardKind::StrictFormat | RewardKind::SoftFormat | RewardKind::XmlCount
        )
    }
}

/// What the answer section of a completion holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extracted<'a> {
    /// No `\boxed` / no answer tag at all.
    Missing,
    /// `\boxed{` without its closing brace.
    Unclosed,
    Found(&'a str),
}

impl<'a> Extracted<'a> {
    pub fn text(self) -> Option<&'a str> {
        match self {
            Extracted::Found(s) => Some(s),
            _ => None,
        }
    }
}

/// How the answer of a completion compares with the gold one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AnswerStatus {
    Correct,
    Wrong,
    /// An answer section exists but holds no number (or is unclosed).
    Unparsable,
    NoAnswer,
}

/// The graded answer of one completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The answer section's text, trimmed.
    pub answer: Option<String>,
    /// Its numeric value.
    pub value: Option<f64>,
    pub status: AnswerStatus,
    /// Ended on its own (stop token), not cut by `max_tokens`.
    pub finished: bool,
}

impl Verdict {
    /// Correct and finished: what evaluation counts as solved (TapeAgents' success).
    pub fn solved(&self) -> bool {
        crate::stats::solved(self.status, self.finished)
    }

    /// A numeric answer where the style puts it: what the format rate counts.
    pub fn formatted(&self) -> bool {
        crate::stats::formatted(self.status)
    }
}

/// The content of the last `\boxed{...}`, braces balanced.
pub fn extract_boxed(text: &str) -> Extracted<'_> {
    let Some(pos) = text.rfind("\\boxed") else {
        return Extracted::Missing;
    };
    let after = pos + "\\boxed".len();
    let rest = &text[after..];
    let skipped = rest.len() - rest.trim_start().len();
    let open = after + skipped;
    if !text[open..].starts_with('{') {
        return Extracted::Unclosed;
    }
    match matching_brace(text, open) {
        Some(close) => Extracted::Found(text[open + 1..close].trim()),
        None => Extracted::Unclosed,
    }
}

/// The content of the last answer tag; without a closing tag, everything after the opening one.
pub fn extract_tagged<'a>(text: &'a str, tags: &Tags) -> Extracted<'a> {
    let Some(pos) = text.rfind(tags.answer_open) else {
        return Extracted::Missing;
    };
    let rest = &text[pos + tags.answer_open.len()..];
    let inner = match rest.find(tags.answer_close) {
        Some(end) => &rest[..end],
        None => rest,
    };
    Extracted::Found(inner.trim())
}

/// The answer section of a completion in the given style.
pub fn extract_answer(style: PromptStyle, text: &str) -> Extracted<'_> {
    match style.tags() {
        None => extract_boxed(text),
        Some(tags) => extract_tagged(text, &tags),
    }
}

/// Grades a completion's answer against the gold one.
pub fn verdict(style: PromptStyle, text: &str, finished: bool, gold: &Gold) -> Verdict {
    let extracted = extract_answer(style, text);
    let answer = extracted.text().map(str::to_string);
    let value = extracted.text().and_then(parse_number);
    let status = match (extracted, value) {
        (Extracted::Missing, _) => AnswerStatus::NoAnswer,
        (_, None) => AnswerStatus::Unparsable,
        (_, Some(v)) if same_number(v, gold.value) => AnswerStatus::Correct,
        (_, Some(_)) => AnswerStatus::Wrong,
    };
    Verdict {
        answer,
        value,
        status,
        finished,
    }
}

/// TapeAgents: +1 correct and finished, 0 wrong and finished, -1 otherwise (nothing parseable, or
/// truncated).
pub fn tapeagents(v: &Verdict) -> f64 {
    match (v.status, v.finished) {
        (AnswerStatus::Correct, true) => 1.0,
        (AnswerStatus::Wrong, true) => 0.0,
        _ => -1.0,
    }
}

struct TagRegexes {
    strict: Regex,
    soft: Regex,
}

fn tag_regexes(style: PromptStyle) -> Option<&'static TagRegexes> {
    static BUILT: LazyLock<BTreeMap<&'static str, TagRegexes>> = LazyLock::new(|| {
        PromptStyle::ALL
            .into_iter()
            .filter_map(|s| {
                let t = s.tags()?;
                let (to, tc, ao, ac) = (
                    regex::escape(t.think_open),
                    regex::escape(t.think_close),
                    regex::escape(t.answer_open),
                    regex::escape(t.answer_close),
                );
                let strict = Regex::new(&format!("(?s)\\A{to}\n.+?\n{tc}\n{ao}\n.+?\n{ac}\n?\\z"));
                let soft = Regex::new(&format!("(?s)\\A\\s*{to}.*?{tc}\\s*{ao}.*?{ac}"));
                Some((
                    s.name(),
                    TagRegexes {
                        strict: strict.ok()?,
                        soft: soft.ok()?,
                    },
                ))
            })
            .collect()
    });
    BUILT.get(style.name())
}

/// 0.5 when the whole completion is exactly the think block then the answer block.
pub fn strict_format(style: PromptStyle, text: &str) -> f64 {
    match tag_regexes(style) {
        Some(r) if r.strict.is_match(text) => 0.5,
        _ => 0.0,
    }
}

/// 0.5 when the completion starts with a think block followed by an answer block.
pub fn soft_format(style: PromptStyle, text: &str) -> f64 {
    match tag_regexes(style) {
        Some(r) if r.soft.is_match(text) => 0.5,
        _ => 0.0,
    }
}

/// The notebooks' `count_xml`, with the style's tags.
pub fn xml_count(style: PromptStyle, text: &str) -> f64 {
    let Some(t) = style.tags() else {
        return 0.0;
    };
    let chars = |s: &str| s.chars().count() as f64;
    let once = |needle: &str| text.matches(needle).count() == 1;
    let mut count = 0.0;
    if once(&format!("{}\n", t.think_open)) {
        count += 0.125;
    }
    if once(&format!("\n{}\n", t.think_close)) {
        count += 0.125;
    }
    if once(&format!("\n{}\n", t.answer_open)) {
        count += 0.125;
        let tail = text
            .rsplit(&format!("\n{}\n", t.answer_close))
            .next()
            .unwrap_or("");
        count -= chars(tail) * 0.001;
    }
    let close = format!("\n{}", t.answer_close);
    if once(&close) {
        count += 0.125;
        let tail = text.rsplit(close.as_str()).next().unwrap_or("");
        count -= (chars(tail) - 1.0) * 0.001;
    }
    count
}

/// 0.5 when the extracted answer is an integer.
pub fn integer_answer(answer: Option<&str>) -> f64 {
    let is_int = answer.is_some_and(|a| {
        let digits = a.strip_prefix('-').unwrap_or(a);
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
    });
    if is_int {
        0.5
    } else {
        0.0
    }
}

/// Partial credit on the numeric answer: 3.0 exact, 1.5 within 10%, 0.5 within 20%, -0.5 wrong,
/// 0.0 when there is no numeric answer.
pub fn correctness(value: Option<f64>, gold: &Gold) -> f64 {
    let Some(v) = value else {
        return 0.0;
    };
    if same_number(v, gold.value) {
        return 3.0;
    }
    if gold.value != 0.0 {
        let ratio = v / gold.value;
        if (0.9..=1.1).contains(&ratio) {
            return 1.5;
        }
        if (0.8..=1.2).contains(&ratio) {
            return 0.5;
        }
    }
    -0.5
}

static NUMBER: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+").ok());

/// 1.5 when the first number in the answer section equals the gold answer, else 0.
pub fn number_match(answer: Option<&str>, gold: &Gold) -> f64 {
    let first = answer
        .and_then(|a| NUMBER.as_ref()?.find(a))
        .map(|m| m.as_str());
    let value = first.and_then(|s| s.replace(',', "").parse::<f64>().ok());
    match value {
        Some(v) if same_number(v, gold.value) => 1.5,
        _ => 0.0,
    }
}

static EQUATION_SPAN: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"@@@@(.*?)@@@@").ok());
static EQUATION: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let num = r"(-?\d[\d,]*(?:\.\d+)?)";
    Regex::new(&format!(
        r"\A\s*{num}\s*([-+*/x×÷])\s*{num}\s*=\s*{num}\s*\z"
    ))
    .ok()
});

/// The fraction of `@@@@ a op b = c @@@@` steps whose arithmetic is right (a malformed step counts
/// as wrong); 0 when there are none.
pub fn equations(text: &str) -> f64 {
    let (Some(span), Some(eq)) = (EQUATION_SPAN.as_ref(), EQUATION.as_ref()) else {
        return 0.0;
    };
    let mut total = 0usize;
    let mut right = 0usize;
    for inner in span.captures_iter(text).filter_map(|c| c.get(1)) {
        total += 1;
        let ok = eq.captures(inner.as_str()).is_some_and(|c| {
            let num = |i: usize| {
                c.get(i)
                    .and_then(|m| m.as_str().replace(',', "").parse::<f64>().ok())
            };
            let (Some(a), Some(b), Some(result)) = (num(1), num(3), num(4)) else {
                return false;
            };
            let computed = match c.get(2).map(|m| m.as_str()) {
                Some("+") => a + b,
                Some("-") => a - b,
                Some("*" | "x" | "×") => a * b,
                Some("/" | "÷") if b != 0.0 => a / b,
                _ => return false,
            };
            same_number(result, computed)
        });
        if ok {
            right += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        right as f64 / total as f64
    }
}

/// The value of one reward kind for a completion.
pub fn component(
    kind: RewardKind,
    style: PromptStyle,
    text: &str,
    v: &Verdict,
    gold: &Gold,
) -> f64 {
    match kind {
        RewardKind::Tapeagents => tapeagents(v),
        RewardKind::StrictFormat => strict_format(style, text),
        RewardKind::SoftFormat => soft_format(style, text),
        RewardKind::XmlCount => xml_count(style, text),
        RewardKind::IntegerAnswer => integer_answer(v.answer.as_deref()),
        RewardKind::Correctness => correctness(v.value, gold),
        RewardKind::NumberMatch => number_match(v.answer.as_deref(), gold),
        RewardKind::Equations => equations(text),
    }
}

/// A completion's reward: the weighted total, every configured component's own value, and the
/// graded answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub total: f64,
    pub components: BTreeMap<RewardKind, f64>,
    pub verdict: Verdict,
}

/// Scores a completion with the configured weights (`rewards:` in the config).
pub fn score(
    weights: &BTreeMap<RewardKind, f64>,
    style: PromptStyle,
    text: &str,
    finished: bool,
    gold: &Gold,
) -> Scored {
    let v = verdict(style, text, finished, gold);
    let components: BTreeMap<RewardKind, f64> = weights
        .keys()
        .map(|&k| (k, component(k, style, text, &v, gold)))
        .collect();
    let total = components.iter().map(|(k, value)| weights[k] * value).sum();
    Scored {
        total,
        components,
        verdict: v,
    }
}
