//! A schema-driven HTTP fuzzer for the services' tests: it reads a running service's own
//! `GET /openapi.json`, generates request bodies from each operation's schema (seeded, so a
//! failure replays), and sends them to every operation of the document, checking what a client
//! may rely on whatever it sends: no 5xx, an answer within the deadline, no non-finite number
//! in an answer (JSON has none; serde writes `null`), and a healthy service afterwards.
//!
//! Bodies are of three kinds, in about equal shares: what the schema allows, filled with the
//! numbers that break arithmetic (`5e-324`, `1e300`, `-0`, the integer bounds) and strings that
//! break parsers; the same with one field dropped, added, or given another type; and bodies
//! that are not the schema at all (another JSON type, truncated or invalid JSON).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

/// What a fuzzing run sent and saw.
#[derive(Debug, Default, Clone)]
pub struct FuzzReport {
    /// Requests sent.
    pub sent: usize,
    /// How many answers had each status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests sent per operation (`POST /v1/score`).
    pub per_operation: BTreeMap<String, usize>,
    /// Every broken promise: the operation, the body and what went wrong.
    pub problems: Vec<String>,
}

impl FuzzReport {
    /// One line: requests sent, statuses seen, requests per operation.
    pub fn summary(&self, service: &str, seed: u64) -> String {
        format!(
            "fuzz {service} (seed {seed}): {} requests, statuses {:?}, per operation {:?}",
            self.sent, self.statuses, self.per_operation
        )
    }
}

/// Sends `cases` generated requests to every operation of the service at `base` (key `api_key`),
/// each with `deadline`, from `seed`.
pub async fn fuzz(
    base: &str,
    api_key: Option<&str>,
    cases: usize,
    seed: u64,
    deadline: Duration,
) -> Result<FuzzReport, reqwest::Error> {
    let http = reqwest::Client::builder().timeout(deadline).build()?;
    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut report = FuzzReport::default();
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    for (path, item) in &paths {
        for method in ["get", "post", "put", "delete"] {
            let op = &item[method];
            if !op.is_object() {
                continue;
            }
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            // Bodyless operations have less to vary: a tenth as many.
            let n = if schema.is_null() {
                (cases / 10).max(3)
            } else {
                cases
            };
            let name = format!("{} {path}", method.to_uppercase());
            for _ in 0..n {
                let body = (!schema.is_null()).then(|| body(&doc, schema, &mut rng));
                let url_path = fill_params(path, &mut rng);
                send(
                    &http,
                    base,
                    api_key,
                    method,
                    &url_path,
                    &name,
                    body,
                    &mut report,
                )
                .await;
            }
        }
    }
    let health = http.get(format!("{base}/health")).send().await;
    match health {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => report
            .problems
            .push(format!("GET /health answers {} after fuzzing", r.status())),
        Err(e) => report
            .problems
            .push(format!("GET /health fails after fuzzing: {e}")),
    }
    Ok(report)
}

/// One request and its checks.
#[allow(clippy::too_many_arguments)]
async fn send(
    http: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    method: &str,
    path: &str,
    name: &str,
    body: Option<String>,
    report: &mut FuzzReport,
) {
    let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let mut rb = http.request(m, format!("{base}{path}"));
    if let Some(k) = api_key {
        rb = rb.bearer_auth(k);
    }
    if let Some(b) = &body {
        rb = rb
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(b.clone());
    }
    report.sent += 1;
    *report.per_operation.entry(name.to_string()).or_default() += 1;
    let shown = || {
        let b = body.as_deref().unwrap_or("");
        let cut: String = b.chars().take(300).collect();
        format!("{name} {cut}")
    };
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            report.problems.push(format!("{}: no answer: {e}", shown()));
            return;
        }
    };
    let status = resp.status().as_u16();
    *report.statuses.entry(status).or_default() += 1;
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => {
            report
                .problems
                .push(format!("{}: reading the answer: {e}", shown()));
            return;
        }
    };
    if status >= 500 {
        report
            .problems
            .push(format!("{}: HTTP {status}: {text}", shown()));
        return;
    }
    let is_json = text.starts_with('{') || text.starts_with('[');
    if status < 300 && is_json {
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => {
                if let Some(at) = non_finite(&v, "") {
                    report.problems.push(format!(
                        "{}: a null where a number belongs at {at}",
                        shown()
                    ));
                }
            }
            Err(e) => report
                .problems
                .push(format!("{}: the answer is not JSON: {e}", shown())),
        }
    }
}

/// Where `v` holds a `null` inside an array or as a `logprob` (a number in both services'
/// schemas): the trace a NaN or an infinity leaves in JSON. (`logprobs: null` is OpenAI's
/// "not asked for".)
fn non_finite(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::Array(items) => items.iter().enumerate().find_map(|(i, x)| {
            let here = format!("{at}[{i}]");
            if x.is_null() {
                Some(here)
            } else {
                non_finite(x, &here)
            }
        }),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let here = format!("{at}.{k}");
            if x.is_null() && k == "logprob" {
                Some(here)
            } else {
                non_finite(x, &here)
            }
        }),
        _ => None,
    }
}

/// A body for `schema`: valid-looking, mutated, or not the schema at all.
fn body(doc: &Value, schema: &Value, rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..10) {
        0..=3 => value(doc, schema, rng, 0).to_string(),
        4..=7 => mutate(value(doc, schema, rng, 0), rng).to_string(),
        8 => any_json(rng, 0).to_string(),
        _ => {
            let s = value(doc, schema, rng, 0).to_string();
            // Truncated, or not JSON at all.
            let cut = rng.random_range(0..=s.len());
            match rng.random_range(0..3) {
                0 => s.get(..cut).unwrap_or("").to_string(),
                1 => "\u{0}\u{ff}{{not json".into(),
                _ => format!("{s}{s}"),
            }
        }
    }
}

/// Follows a `$ref` to its component schema.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or("");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Path segments for the parameters of a path (`{name}`): plain, hidden, long, escaped.
const SEGMENTS: [&str; 7] = [
    "a",
    "iter_0",
    ".hidden",
    "a.b-c_d",
    "%2e%2e",
    "%00",
    "%E2%80%AE",
];

/// `path` with each `{param}` replaced by a generated segment.
fn fill_params(path: &str, rng: &mut ChaCha8Rng) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                if rng.random_bool(0.1) {
                    "x".repeat(200)
                } else {
                    SEGMENTS.choose(rng).unwrap_or(&"a").to_string()
                }
            } else {
                seg.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The numbers that break arithmetic.
const NUMBERS: [f64; 14] = [
    0.0, -0.0, 1.0, -1.0, 0.5, 5e-324, -5e-324, 1e-5, 1e-7, 2.0, 100.0, 100.5, 1e300, -1e300,
];

/// The integers at and past the bounds of the usual widths.
const INTEGERS: [i64; 10] = [
    0,
    1,
    2,
    -1,
    127,
    65_536,
    i32::MAX as i64,
    u32::MAX as i64,
    u32::MAX as i64 + 1,
    i64::MAX,
];

/// The strings that break parsers and templates.
const STRINGS: [&str; 8] = [
    "",
    "a",
    "user",
    "What is 2 + 2?",
    "{{ raise_exception('x') }}",
    "\u{0}\u{1b}[31m\u{202e}",
    "../../../../etc/passwd",
    "数学 🧮",
];

/// A value of `schema` (a few levels deep), mostly within its bounds.
fn value(doc: &Value, schema: &Value, rng: &mut ChaCha8Rng, depth: usize) -> Value {
    let schema = resolve(doc, schema);
    if depth > 5 {
        return Value::Null;
    }
    // A schema of its own with rules beside it (`allOf` of `if`/`then`, a `oneOf` of required
    // fields): its own type is generated, the rules are the server's to hold.
    let has_type = schema.get("type").is_some() || schema.get("properties").is_some();
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array().filter(|_| !has_type) {
            if let Some(s) = options.choose(rng) {
                return value(doc, s, rng, depth + 1);
            }
        }
    }
    if let Some(all) = schema["allOf"].as_array().filter(|_| !has_type) {
        if let Some(s) = all.first() {
            return value(doc, s, rng, depth + 1);
        }
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(options) = schema["enum"].as_array() {
        if let Some(v) = options.choose(rng) {
            return v.clone();
        }
    }
    let kind = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .choose(rng)
            .and_then(Value::as_str)
            .unwrap_or("null")
            .to_string(),
        _ => return any_json(rng, depth),
    };
    match kind.as_str() {
        "object" => {
            let mut m = Map::new();
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if required.contains(&k.as_str()) || rng.random_bool(0.5) {
                        m.insert(k.clone(), value(doc, s, rng, depth + 1));
                    }
                }
            }
            Value::Object(m)
        }
        "array" => {
            let min = schema["minItems"].as_u64().unwrap_or(0) as usize;
            let len = if rng.random_bool(0.9) {
                rng.random_range(min..min + 4)
            } else {
                rng.random_range(0..64)
            };
            let items = &schema["items"];
            Value::Array(
                (0..len)
                    .map(|_| value(doc, items, rng, depth + 1))
                    .collect(),
            )
        }
        "integer" => {
            let (lo, hi) = (schema["minimum"].as_i64(), schema["maximum"].as_i64());
            if rng.random_bool(0.6) {
                let lo = lo.unwrap_or(0);
                let hi = hi.unwrap_or(lo + 16).max(lo);
                json!(rng.random_range(lo..=hi.min(lo + 64)))
            } else {
                let v = *INTEGERS.choose(rng).unwrap_or(&0);
                json!(if rng.random_bool(0.1) { -v } else { v })
            }
        }
        "number" => {
            if rng.random_bool(0.4) {
                json!(rng.random_range(0.0..2.0))
            } else {
                json!(*NUMBERS.choose(rng).unwrap_or(&0.0))
            }
        }
        "string" => json!(STRINGS.choose(rng).unwrap_or(&"")),
        "boolean" => json!(rng.random_bool(0.5)),
        _ => Value::Null,
    }
}

/// Any JSON value, a few levels deep.
fn any_json(rng: &mut ChaCha8Rng, depth: usize) -> Value {
    let top = if depth > 2 { 4 } else { 6 };
    match rng.random_range(0..top) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(*NUMBERS.choose(rng).unwrap_or(&0.0)),
        3 => json!(STRINGS.choose(rng).unwrap_or(&"")),
        4 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| any_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..3) {
                m.insert(
                    STRINGS.choose(rng).unwrap_or(&"k").to_string(),
                    any_json(rng, depth + 1),
                );
            }
            Value::Object(m)
        }
    }
}

/// `v` with one thing changed: a field dropped, added, or given a value of another type.
fn mutate(mut v: Value, rng: &mut ChaCha8Rng) -> Value {
    let Value::Object(m) = &mut v else {
        return any_json(rng, 0);
    };
    let keys: Vec<String> = m.keys().cloned().collect();
    match (rng.random_range(0..3), keys.choose(rng)) {
        (0, Some(k)) => {
            m.remove(k);
        }
        (1, Some(k)) => {
            m.insert(k.clone(), any_json(rng, 1));
        }
        _ => {
            m.insert("unknown_field".into(), any_json(rng, 1));
        }
    }
    v
}
