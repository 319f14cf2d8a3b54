//! Every reward kind against hand-written completions, including the tricky ones: several
//! `\boxed{}`, nested braces, thousands commas, dollar signs, negative numbers, text after the
//! answer, a missing closing tag, truncated output.

use std::collections::BTreeMap;

use rl_core::prompts::PromptStyle::{self, Boxed, ReasoningAnswer, ThinkingAnswer, WorkingOut};
use rl_core::rewards::{self, AnswerStatus, RewardKind as K};
use rl_core::tasks::{parse_gold, Gold};

fn gold(n: &str) -> Gold {
    parse_gold(&format!("#### {n}")).expect("gold")
}

struct Case {
    kind: K,
    style: PromptStyle,
    text: &'static str,
    finished: bool,
    gold: &'static str,
    expected: f64,
}

const fn c(
    kind: K,
    style: PromptStyle,
    text: &'static str,
    gold: &'static str,
    expected: f64,
) -> Case {
    Case {
        kind,
        style,
        text,
        finished: true,
        gold,
        expected,
    }
}

const fn truncated(mut case: Case) -> Case {
    case.finished = false;
    case
}

const REASONED: &str = "<reasoning>\nStep\n</reasoning>\n<answer>\n18\n</answer>";

const CASES: &[Case] = &[
    // tapeagents, boxed style
    c(
        K::Tapeagents,
        Boxed,
        "So the answer is \\boxed{18}.",
        "18",
        1.0,
    ),
    c(K::Tapeagents, Boxed, "\\boxed{17}", "18", 0.0),
    c(K::Tapeagents, Boxed, "The answer is 18.", "18", -1.0),
    truncated(c(K::Tapeagents, Boxed, "\\boxed{18} and then", "18", -1.0)),
    truncated(c(K::Tapeagents, Boxed, "Let me think about", "18", -1.0)),
    c(
        K::Tapeagents,
        Boxed,
        "First \\boxed{5}, corrected: \\boxed{18}",
        "18",
        1.0,
    ),
    c(
        K::Tapeagents,
        Boxed,
        "\\boxed{18} but wait, \\boxed{20}",
        "18",
        0.0,
    ),
    c(K::Tapeagents, Boxed, "\\boxed{\\frac{36}{2}}", "18", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{{18}}", "18", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{1,000}", "1,000", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{1,000}", "100", 0.0),
    c(K::Tapeagents, Boxed, "\\boxed{$18.00}", "18", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{\\$18.00}", "18", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{-5}", "-5", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{5}", "-5", 0.0),
    c(K::Tapeagents, Boxed, "\\boxed{18", "18", -1.0),
    c(K::Tapeagents, Boxed, "\\boxed{eighteen}", "18", -1.0),
    c(K::Tapeagents, Boxed, "put it within \\boxed{}", "18", -1.0),
    c(
        K::Tapeagents,
        Boxed,
        "\\boxed{18 \\text{ dollars}}",
        "18",
        1.0,
    ),
    c(
        K::Tapeagents,
        Boxed,
        "\\boxed{18}\nSome text after the answer.",
        "18",
        1.0,
    ),
    c(K::Tapeagents, Boxed, "\\boxed {18}", "18", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{x = 18}", "18", 1.0),
    c(K::Tapeagents, Boxed, "\\boxed{3.5}", "3.5", 1.0),
    c(K::Tapeagents, ReasoningAnswer, REASONED, "18", 1.0),
    c(
        K::Tapeagents,
        ReasoningAnswer,
        "<reasoning>\nx\n</reasoning>\n<answer>\n18",
        "18",
        1.0,
    ),
    c(K::Tapeagents, ReasoningAnswer, "\\boxed{18}", "18", -1.0),
    // strict_format
    c(
        K::StrictFormat,
        ReasoningAnswer,
        "<reasoning>\nStep\n</reasoning>\n<answer>\n18\n</answer>\n",
        "18",
        0.5,
    ),
    c(K::StrictFormat, ReasoningAnswer, REASONED, "18", 0.5),
    c(
        K::StrictFormat,
        ReasoningAnswer,
        "<reasoning>\nStep 1\nStep 2\n</reasoning>\n<answer>\n18\n</answer>",
        "18",
        0.5,
    ),
    c(
        K::StrictFormat,
        ReasoningAnswer,
        "<reasoning>Step</reasoning><answer>18</answer>",
        "18",
        0.0,
    ),
    c(
        K::StrictFormat,
        ReasoningAnswer,
        "<reasoning>\nStep\n</reasoning>\n<answer>\n18\n</answer>\nExtra text",
        "18",
        0.0,
    ),
    c(
        K::StrictFormat,
        ReasoningAnswer,
        "<reasoning>\nStep\n</reasoning>\n<answer>\n18",
        "18",
        0.0,
    ),
    c(
        K::StrictFormat,
        WorkingOut,
        "<start_working_out>\n9+9\n<end_working_out>\n<SOLUTION>\n18\n</SOLUTION>",
        "18",
        0.5,
    ),
    c(
        K::StrictFormat,
        ThinkingAnswer,
        "<thinking>\nx\n</thinking>\n<answer>\n18\n</answer>",
        "18",
        0.5,
    ),
    c(K::StrictFormat, ThinkingAnswer, REASONED, "18", 0.0),
    // soft_format
    c(
        K::SoftFormat,
        ReasoningAnswer,
        "<reasoning>Step</reasoning> <answer>18</answer>",
        "18",
        0.5,
    ),
    c(
        K::SoftFormat,
        ReasoningAnswer,
        "  <reasoning>Step\nmore</reasoning>\n\n<answer>18</answer> trailing",
        "18",
        0.5,
    ),
    c(
        K::SoftFormat,
        ReasoningAnswer,
        "Intro <reasoning>Step</reasoning><answer>18</answer>",
        "18",
        0.0,
    ),
    c(
        K::SoftFormat,
        ReasoningAnswer,
        "<answer>18</answer><reasoning>x</reasoning>",
        "18",
        0.0,
    ),
    c(
        K::SoftFormat,
        ReasoningAnswer,
        "<reasoning>Step</reasoning><answer>18",
        "18",
        0.0,
    ),
    c(
        K::SoftFormat,
        WorkingOut,
        "<start_working_out>x<end_working_out><SOLUTION>18</SOLUTION>",
        "18",
        0.5,
    ),
    // xml_count (the notebooks' count_xml, quirks included: a missing trailing newline after
    // </answer> charges the whole text to the third rule)
    c(
        K::XmlCount,
        ReasoningAnswer,
        "<reasoning>\nStep\n</reasoning>\n<answer>\n18\n</answer>\n",
        "18",
        0.5,
    ),
    c(
        K::XmlCount,
        ReasoningAnswer,
        REASONED,
        "18",
        0.5 - 0.051 + 0.001,
    ),
    c(
        K::XmlCount,
        ReasoningAnswer,
        "<reasoning>\nStep\n</reasoning>\n<answer>\n18\n</answer>\nabc",
        "18",
        0.5 - 0.003 - 0.003,
    ),
    c(K::XmlCount, ReasoningAnswer, "The answer is 18", "18", 0.0),
    c(
        K::XmlCount,
        ReasoningAnswer,
        "<reasoning>\n<reasoning>\nx",
        "18",
        0.0,
    ),
    c(
        K::XmlCount,
        ReasoningAnswer,
        "<reasoning>\nx\n</reasoning>\n",
        "18",
        0.25,
    ),
    // integer_answer
    c(
        K::IntegerAnswer,
        ReasoningAnswer,
        "<answer>\n18\n</answer>",
        "18",
        0.5,
    ),
    c(
        K::IntegerAnswer,
        ReasoningAnswer,
        "<answer>18.5</answer>",
        "18",
        0.0,
    ),
    c(
        K::IntegerAnswer,
        ReasoningAnswer,
        "<answer>-7</answer>",
        "18",
        0.5,
    ),
    c(
        K::IntegerAnswer,
        ReasoningAnswer,
        "<answer>1,000</answer>",
        "18",
        0.0,
    ),
    c(K::IntegerAnswer, ReasoningAnswer, "18", "18", 0.0),
    c(K::IntegerAnswer, Boxed, "\\boxed{42}", "18", 0.5),
    // correctness with partial credit
    c(K::Correctness, Boxed, "\\boxed{100}", "100", 3.0),
    c(K::Correctness, Boxed, "\\boxed{95}", "100", 1.5),
    c(K::Correctness, Boxed, "\\boxed{110}", "100", 1.5),
    c(K::Correctness, Boxed, "\\boxed{115}", "100", 0.5),
    c(K::Correctness, Boxed, "\\boxed{130}", "100", -0.5),
    c(K::Correctness, Boxed, "\\boxed{-100}", "100", -0.5),
    c(K::Correctness, Boxed, "no box at all, 100", "100", 0.0),
    c(K::Correctness, Boxed, "\\boxed{0.05}", "0", -0.5),
    c(
        K::Correctness,
        ReasoningAnswer,
        "<answer>$1,000</answer>",
        "1,000",
        3.0,
    ),
    // number_match
    c(
        K::NumberMatch,
        WorkingOut,
        "<SOLUTION>The total is 18 apples</SOLUTION>",
        "18",
        1.5,
    ),
    c(
        K::NumberMatch,
        WorkingOut,
        "<SOLUTION>1,000</SOLUTION>",
        "1000",
        1.5,
    ),
    c(
        K::NumberMatch,
        WorkingOut,
        "<SOLUTION>17 or 18</SOLUTION>",
        "18",
        0.0,
    ),
    c(
        K::NumberMatch,
        WorkingOut,
        "<SOLUTION>none</SOLUTION>",
        "18",
        0.0,
    ),
    c(K::NumberMatch, WorkingOut, "18 without tags", "18", 0.0),
    c(
        K::NumberMatch,
        WorkingOut,
        "<SOLUTION>-3 degrees",
        "-3",
        1.5,
    ),
    // equations
    c(
        K::Equations,
        Boxed,
        "@@@@ 48 / 2 = 24 @@@@ then @@@@ 48 + 24 = 72 @@@@",
        "72",
        1.0,
    ),
    c(
        K::Equations,
        Boxed,
        "@@@@ 2 + 2 = 5 @@@@ and @@@@ 3 * 4 = 12 @@@@",
        "12",
        0.5,
    ),
    c(
        K::Equations,
        Boxed,
        "@@@@ 1,000 x 3 = 3,000 @@@@",
        "3000",
        1.0,
    ),
    c(K::Equations, Boxed, "@@@@ two plus two @@@@", "4", 0.0),
    c(K::Equations, Boxed, "no equations here", "4", 0.0),
    c(K::Equations, Boxed, "@@@@ 5 - 8 = -3 @@@@", "-3", 1.0),
    c(K::Equations, Boxed, "@@@@ 1 / 0 = 0 @@@@", "0", 0.0),
    c(
        K::Equations,
        Boxed,
        "@@@@ 0.5 * 3 = 1.5 @@@@ @@@@ 7 - 2 = 5 @@@@ @@@@ 9 / 3 = 2 @@@@",
        "5",
        2.0 / 3.0,
    ),
];

#[test]
fn reward_table() {
    assert!(CASES.len() >= 40, "{} cases", CASES.len());
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let g = gold(case.gold);
        let v = rewards::verdict(case.style, case.text, case.finished, &g);
        let got = rewards::component(case.kind, case.style, case.text, &v, &g);
        if (got - case.expected).abs() > 1e-12 {
            failures.push(format!(
                "case {i} {:?}/{}: {:?} (gold {}) -> {got}, expected {}",
                case.kind,
                case.style.name(),
                case.text,
                case.gold,
                case.expected
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every kind is covered by the table.
    for kind in K::ALL {
        assert!(CASES.iter().any(|c| c.kind == kind), "{kind:?} has no case");
    }
}

#[test]
fn verdicts_distinguish_wrong_unparsable_and_missing() {
    let g = gold("18");
    let status = |text: &str| rewards::verdict(Boxed, text, true, &g).status;
    assert_eq!(status("\\boxed{18}"), AnswerStatus::Correct);
    assert_eq!(status("\\boxed{19}"), AnswerStatus::Wrong);
    assert_eq!(status("\\boxed{nineteen}"), AnswerStatus::Unparsable);
    assert_eq!(status("\\boxed{19"), AnswerStatus::Unparsable);
    assert_eq!(status("19"), AnswerStatus::NoAnswer);
    let truncated = rewards::verdict(Boxed, "\\boxed{18}", false, &g);
    assert!(truncated.formatted() && !truncated.solved());
    assert!(rewards::verdict(Boxed, "\\boxed{18}", true, &g).solved());
}

#[test]
fn weighted_total_keeps_every_component() {
    let weights = BTreeMap::from([
        (K::Tapeagents, 1.0),
        (K::Correctness, 0.5),
        (K::Equations, 2.0),
    ]);
    let scored = rewards::score(
        &weights,
        Boxed,
        "@@@@ 9 + 9 = 18 @@@@ so \\boxed{19}",
        true,
        &gold("18"),
    );
    assert_eq!(scored.components[&K::Tapeagents], 0.0);
    assert_eq!(scored.components[&K::Correctness], 1.5);
    assert_eq!(scored.components[&K::Equations], 1.0);
    assert_eq!(scored.components.len(), 3);
    assert!((scored.total - (0.0 + 0.75 + 2.0)).abs() < 1e-12);
    assert_eq!(scored.verdict.value, Some(19.0));
}
