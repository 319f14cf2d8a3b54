//! `learner`: the GRPO update on LoRA adapters. Not built yet: this binary only says so, so that the
//! workspace has its final layout; its issue replaces this file.

fn main() {
    eprintln!("learner: the GRPO update on LoRA adapters — not implemented yet (see the project's open issues).");
    eprintln!("Today the engine is usable through `ref-scorer score` and the `model` library.");
    std::process::exit(2);
}
