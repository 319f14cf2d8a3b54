//! The run's numbers, each defined once: what counts as a solved problem and as a formatted
//! answer (train and eval alike), the rate of either over a set of completions, and the
//! fraction of groups whose rewards are all equal (no GRPO signal). The learner, the
//! orchestrator's summaries and the store's eval summary all compute them here.

use crate::rewards::AnswerStatus;

/// A solved problem: the right number, in a completion that ended on its own (a truncated one
/// is not an answer; TapeAgents' success).
pub fn solved(status: AnswerStatus, finished: bool) -> bool {
    status == AnswerStatus::Correct && finished
}

/// A numeric answer where the prompt style puts it, right or wrong: what the format rate counts.
pub fn formatted(status: AnswerStatus) -> bool {
    matches!(status, AnswerStatus::Correct | AnswerStatus::Wrong)
}

/// The fraction of `items` for which `pred` holds (0 for none).
pub fn rate<T>(items: &[T], pred: impl Fn(&T) -> bool) -> f64 {
    if items.is_empty() {
        return 0.0;
    }
    items.iter().filter(|x| pred(x)).count() as f64 / items.len() as f64
}

/// The mean of `values` (0 for none).
pub fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Whether a group's rewards are all equal: its group-normalised advantages are all zero.
pub fn zero_std(rewards: &[f64]) -> bool {
    rewards.iter().all(|r| *r == rewards[0])
}

/// The fraction of groups with [`zero_std`] rewards (0 for none).
pub fn zero_std_fraction<'a>(groups: impl IntoIterator<Item = &'a [f64]>) -> f64 {
    let flags: Vec<bool> = groups.into_iter().map(zero_std).collect();
    rate(&flags, |z| *z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions() {
        assert!(solved(AnswerStatus::Correct, true));
        assert!(
            !solved(AnswerStatus::Correct, false),
            "truncated is not solved"
        );
        assert!(!solved(AnswerStatus::Wrong, true));
        assert!(formatted(AnswerStatus::Wrong) && !formatted(AnswerStatus::Unparsable));
        assert!(!formatted(AnswerStatus::NoAnswer));
        assert_eq!(rate(&[1, 2, 3, 4], |x| *x > 1), 0.75);
        assert_eq!(rate::<u8>(&[], |_| true), 0.0);
        assert_eq!(mean([1.0, 2.0, 6.0]), 3.0);
        assert_eq!(mean([]), 0.0);
        let groups = [vec![1.0, 1.0], vec![0.0, 1.0], vec![-1.0, -1.0], vec![0.5]];
        assert_eq!(zero_std_fraction(groups.iter().map(Vec::as_slice)), 0.75);
    }
}
