//! YAML in and out for the run config, keeping the line of every key so that a value that is wrong
//! (not only one that fails to parse) can be reported where the user wrote it.
//!
//! The file is parsed with saphyr (YAML 1.2: `2e-6` is a float, `no` is a string) into a
//! `serde_json::Value` plus a map from each key path (`learner.lr`, `lora.targets[1]`) to its line;
//! the typed config is then deserialized from that value. Duplicate keys, anchors to nowhere and
//! non-string keys are errors.

use std::collections::BTreeMap;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, Yaml, YamlData, YamlEmitter};
use serde_json::{Map, Number, Value};

/// Where a value came from: a line of the file or a command-line override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Line(usize),
    Override(String),
}

/// A parsed document: the value tree and the origin of every key path in it.
#[derive(Debug, Clone, Default)]
pub struct Document {
    pub value: Value,
    pub origins: BTreeMap<String, Origin>,
}

/// A YAML syntax (or structure) error at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

impl Document {
    /// Parses one YAML document; an empty file is an empty mapping.
    pub fn parse(text: &str) -> Result<Document, SyntaxError> {
        let docs = MarkedYaml::load_from_str(text).map_err(|e| SyntaxError {
            line: e.marker().line(),
            message: e.info().to_string(),
        })?;
        let mut doc = Document::default();
        match docs.as_slice() {
            [] => doc.value = Value::Object(Map::new()),
            [one] => doc.value = convert(one, "", &mut doc.origins)?,
            [_, second, ..] => {
                return Err(SyntaxError {
                    line: second.span.start.line(),
                    message: "more than one YAML document (`---`); a config is one document".into(),
                })
            }
        }
        Ok(doc)
    }

    /// The origin of a key path, or of its nearest ancestor that has one.
    pub fn origin_of(&self, path: &str) -> Option<&Origin> {
        let mut p = path;
        loop {
            if let Some(o) = self.origins.get(p) {
                return Some(o);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// Sets `dotted.key` to `value` (creating sections on the way), recording `origin` for it.
    pub fn set(&mut self, key: &str, value: Value, origin: Origin) -> Result<(), String> {
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("`{key}` is not a dotted key like `learner.lr`"));
        }
        let mut node = &mut self.value;
        for (i, part) in parts.iter().enumerate() {
            let Value::Object(map) = node else {
                let parent = parts[..i].join(".");
                return Err(format!(
                    "`{parent}` is a value, not a section, so it has no `{part}`"
                ));
            };
            if i + 1 == parts.len() {
                map.insert((*part).to_string(), value);
                break;
            }
            node = map
                .entry((*part).to_string())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        self.origins.retain(|k, _| {
            !(k == key || k.starts_with(&format!("{key}.")) || k.starts_with(&format!("{key}[")))
        });
        self.origins.insert(key.to_string(), origin);
        Ok(())
    }
}

/// Parses the value of a `key=value` override as a YAML flow value (`3`, `1e-5`, `[q_proj,v_proj]`,
/// `null`, `"text"`).
pub fn parse_value(text: &str) -> Result<Value, String> {
    let doc = Document::parse(text).map_err(|e| e.message)?;
    Ok(doc.value)
}

fn convert(
    node: &MarkedYaml<'_>,
    path: &str,
    origins: &mut BTreeMap<String, Origin>,
) -> Result<Value, SyntaxError> {
    let line = node.span.start.line();
    let fail = |message: String| SyntaxError { line, message };
    Ok(match &node.data {
        YamlData::Value(scalar) => scalar_value(scalar).map_err(fail)?,
        YamlData::Representation(text, _, _) => {
            scalar_value(&Scalar::parse_from_cow(text.clone())).map_err(fail)?
        }
        YamlData::Sequence(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let p = format!("{path}[{i}]");
                    origins.insert(p.clone(), Origin::Line(item.span.start.line()));
                    convert(item, &p, origins)
                })
                .collect::<Result<_, _>>()?,
        ),
        YamlData::Mapping(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let key = match &k.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                    YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                    _ => {
                        return Err(SyntaxError {
                            line: k.span.start.line(),
                            message: "a key must be a plain word (like `lr`)".into(),
                        })
                    }
                };
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                origins.insert(p.clone(), Origin::Line(k.span.start.line()));
                let value = convert(v, &p, origins)?;
                map.insert(key, value);
            }
            Value::Object(map)
        }
        YamlData::Tagged(_, inner) => convert(inner, path, origins)?,
        YamlData::Alias(_) | YamlData::BadValue => {
            return Err(fail("an alias or value that cannot be resolved".into()))
        }
    })
}

fn scalar_value(s: &Scalar<'_>) -> Result<Value, String> {
    Ok(match s {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number((*i).into()),
        Scalar::FloatingPoint(f) => {
            let f = f.into_inner();
            Value::Number(Number::from_f64(f).ok_or_else(|| format!("{f} is not a finite number"))?)
        }
        Scalar::String(s) => Value::String(s.to_string()),
    })
}

/// Writes a value tree as YAML (block style; multi-line strings as literal blocks).
pub fn to_yaml_string(value: &Value) -> Result<String, String> {
    let yaml = to_yaml(value);
    let mut out = String::new();
    let mut emitter = YamlEmitter::new(&mut out);
    emitter.multiline(true);
    emitter.dump(&yaml).map_err(|e| e.to_string())?;
    let body = out.strip_prefix("---\n").unwrap_or(&out).to_string();
    Ok(body + "\n")
}

fn to_yaml(value: &Value) -> Yaml<'static> {
    match value {
        Value::Null => Yaml::Value(Scalar::Null),
        Value::Bool(b) => Yaml::Value(Scalar::Boolean(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Yaml::Value(Scalar::Integer(i)),
            (None, Some(f)) => Yaml::Value(Scalar::FloatingPoint(f.into())),
            (None, None) => Yaml::Value(Scalar::String(n.to_string().into())),
        },
        Value::String(s) => Yaml::Value(Scalar::String(s.clone().into())),
        Value::Array(items) => Yaml::Sequence(items.iter().map(to_yaml).collect()),
        Value::Object(map) => Yaml::Mapping(
            map.iter()
                .map(|(k, v)| (Yaml::Value(Scalar::String(k.clone().into())), to_yaml(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_keys_and_items() {
        let doc = Document::parse("a: 1\nb:\n  c: 2e-6\n  d: [x, y]\n  e:\n    - 3\n    - 4\n")
            .expect("parse");
        assert_eq!(doc.value["b"]["c"], serde_json::json!(2e-6));
        assert_eq!(doc.origins["a"], Origin::Line(1));
        assert_eq!(doc.origins["b.c"], Origin::Line(3));
        assert_eq!(doc.origins["b.e[1]"], Origin::Line(7));
        assert_eq!(doc.origin_of("b.d[5].z"), Some(&Origin::Line(4)));
    }

    #[test]
    fn duplicate_keys_and_bad_syntax_name_the_line() {
        let e = Document::parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(e.line, 3, "{e:?}");
        let e = Document::parse("a: 1\nb: [1, 2\n").expect_err("unclosed");
        assert!(e.line >= 2, "{e:?}");
    }

    #[test]
    fn round_trip() {
        let v = serde_json::json!({
            "s": "two\nlines", "n": null, "t": "true", "num": "12", "e": "", "f": 2e-6,
            "i": -3, "l": ["q_proj", "v_proj"], "m": {"x": 1.5}
        });
        let text = to_yaml_string(&v).expect("emit");
        assert_eq!(Document::parse(&text).expect("reparse").value, v, "{text}");
    }
}
