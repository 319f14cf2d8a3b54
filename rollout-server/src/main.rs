//! `rollout-server`: the HTTP sampling service (policy = base model + LoRA adapter). Not built yet: this binary only says so, so that the
//! workspace has its final layout; its issue replaces this file.

fn main() {
    eprintln!("rollout-server: the HTTP sampling service (policy = base model + LoRA adapter) — not implemented yet (see the project's open issues).");
    eprintln!("Today the engine is usable through `ref-scorer score` and the `model` library.");
    std::process::exit(2);
}
