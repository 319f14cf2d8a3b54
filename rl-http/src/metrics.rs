//! Prometheus text for `/metrics`.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Resident memory of this process in bytes (Linux), for `/metrics`.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Appends one Prometheus sample with its HELP and TYPE lines.
pub fn prom(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Appends an info metric: one sample of value 1 whose labels carry the facts.
pub fn prom_info(out: &mut String, name: &str, help: &str, labels: &[(&str, &str)]) {
    use std::fmt::Write;
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{}}} 1",
        labels.join(",")
    );
}

/// Appends `{prefix}_matmul_backend_info{kernels="...",isa="..."} 1`: who runs the model's
/// matrix products (`model::Engine::matmul_backend`: onednn, bf16-kernel or candle) and the
/// instruction set oneDNN dispatches to (`none` otherwise).
pub fn prom_matmul_backend(out: &mut String, prefix: &str, matmul: (&str, Option<&str>)) {
    prom_info(
        out,
        &format!("{prefix}_matmul_backend_info"),
        "Who runs the model's matrix products (onednn, bf16-kernel, candle) and oneDNN's ISA.",
        &[("kernels", matmul.0), ("isa", matmul.1.unwrap_or("none"))],
    );
}

/// A `/metrics` response in Prometheus' text format.
pub fn prom_response(body: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
