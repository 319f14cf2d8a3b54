//! `orchestrate`: orchestrate, the actor loop from config to trained adapter. Not built yet: this binary only says so, so that the
//! workspace has its final layout; its issue replaces this file.

fn main() {
    eprintln!("orchestrate: orchestrate, the actor loop from config to trained adapter — not implemented yet (see the project's open issues).");
    eprintln!("Today the engine is usable through `ref-scorer score` and the `model` library.");
    std::process::exit(2);
}
