//! The contract check of a running service against its own `GET /openapi.json`: what the
//! document promises about routes and methods is what the server answers.

/// Checks a running service against its own `GET /openapi.json`: every documented operation
/// answers (any status but 404 and 405; a POST is sent `{}`), every other method on a documented
/// path is refused with 405, every `$ref` resolves, and an undocumented path is 404. Returns the document and what
/// disagreed (empty when the routes and the document agree).
pub async fn check_contract(
    base: &str,
    api_key: Option<&str>,
) -> Result<(serde_json::Value, Vec<String>), reqwest::Error> {
    let http = reqwest::Client::new();
    let doc: serde_json::Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    let mut problems = Vec::new();
    let methods = ["get", "post", "put", "delete", "patch"];
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    if paths.is_empty() {
        problems.push("the document lists no path".to_string());
    }
    for (path, item) in &paths {
        for m in methods {
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes())
                .unwrap_or(reqwest::Method::GET);
            let mut rb = http.request(method, format!("{base}{path}"));
            if let Some(k) = api_key {
                rb = rb.bearer_auth(k);
            }
            if m == "post" || m == "put" || m == "patch" {
                rb = rb
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body("{}");
            }
            let status = rb.send().await?.status().as_u16();
            let documented = item[m].is_object();
            if documented && (status == 404 || status == 405) {
                problems.push(format!("{m} {path} is documented but answers {status}"));
            }
            if !documented && status != 405 {
                problems.push(format!("{m} {path} answers {status} but is not documented"));
            }
        }
    }
    // Every schema a `$ref` names is in the document.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    for r in refs {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(&r);
        if !doc["components"]["schemas"][name].is_object() {
            problems.push(format!("`$ref` {r} names no schema of the document"));
        }
    }
    let status = http
        .get(format!("{base}/no/such/route"))
        .send()
        .await?
        .status()
        .as_u16();
    if status != 404 {
        problems.push(format!("an undocumented path answers {status}, not 404"));
    }
    Ok((doc, problems))
}

/// Every `$ref` string in a JSON document.
fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}
