//! Prompt styles: how a GSM8K question becomes chat messages, and where the answer is expected in
//! the completion. TapeAgents' boxed style (no system prompt, the instruction after the question)
//! and the seed notebooks' tag styles (a system prompt describing the tags, the bare question).

use serde::{Deserialize, Serialize};

/// One chat message, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// Where the reasoning and the answer go.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum PromptStyle {
    /// TapeAgents: `{question}\nPlease reason step by step, and put your final answer within \boxed{}.`
    Boxed,
    /// `<reasoning>...</reasoning>\n<answer>...</answer>` (the GRPO GSM8K demo notebooks).
    ReasoningAnswer,
    /// `<thinking>...</thinking>\n<answer>...</answer>`.
    ThinkingAnswer,
    /// `<start_working_out>...<end_working_out><SOLUTION>...</SOLUTION>` (Unsloth's notebooks).
    WorkingOut,
}

/// The four tags of a tag style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tags {
    pub think_open: &'static str,
    pub think_close: &'static str,
    pub answer_open: &'static str,
    pub answer_close: &'static str,
}

const BOXED_INSTRUCTION: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

impl PromptStyle {
    pub const ALL: [PromptStyle; 4] = [
        PromptStyle::Boxed,
        PromptStyle::ReasoningAnswer,
        PromptStyle::ThinkingAnswer,
        PromptStyle::WorkingOut,
    ];

    /// The name the config uses (the serde name, derived by the same rule).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The tags of a tag style; `None` for the boxed style.
    pub fn tags(self) -> Option<Tags> {
        let (think_open, think_close, answer_open, answer_close) = match self {
            PromptStyle::Boxed => return None,
            PromptStyle::ReasoningAnswer => {
                ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
            }
            PromptStyle::ThinkingAnswer => ("<thinking>", "</thinking>", "<answer>", "</answer>"),
            PromptStyle::WorkingOut => (
                "<start_working_out>",
                "<end_working_out>",
                "<SOLUTION>",
                "</SOLUTION>",
            ),
        };
        Some(Tags {
            think_open,
            think_close,
            answer_open,
            answer_close,
        })
    }

    /// The style's own system prompt (`None`: no system message, the model's template default).
    pub fn default_system_prompt(self) -> Option<String> {
        match self {
            PromptStyle::Boxed => None,
            PromptStyle::ReasoningAnswer | PromptStyle::ThinkingAnswer => {
                let t = self.tags()?;
                Some(format!(
                    "Respond in the following format:\n{}\n...\n{}\n{}\n...\n{}",
                    t.think_open, t.think_close, t.answer_open, t.answer_close
                ))
            }
            PromptStyle::WorkingOut => {
                let t = self.tags()?;
                Some(format!(
                    "You are given a problem.\nThink about the problem and provide your working out.\n\
                     Place it between {} and {}.\nThen, provide your solution between {}{}",
                    t.think_open, t.think_close, t.answer_open, t.answer_close
                ))
            }
        }
    }

    /// The chat messages for a question. `system` overrides the style's system prompt: `Some("")`
    /// means no system message at all.
    pub fn messages(self, question: &str, system: Option<&str>) -> Vec<ChatMessage> {
        let system = match system {
            Some(s) => (!s.is_empty()).then(|| s.to_string()),
            None => self.default_system_prompt(),
        };
        let user = match self {
            PromptStyle::Boxed => format!("{question}\n{BOXED_INSTRUCTION}"),
            _ => question.to_string(),
        };
        let mut out = Vec::with_capacity(2);
        if let Some(s) = system {
            out.push(ChatMessage::new("system", s));
        }
        out.push(ChatMessage::new("user", user));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_is_tapeagents_prompt() {
        let m = PromptStyle::Boxed.messages("What is 2+3?", None);
        assert_eq!(
            m,
            vec![ChatMessage::new(
                "user",
                "What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}."
            )]
        );
    }

    #[test]
    fn tag_styles_have_system_prompts_naming_their_tags() {
        for style in PromptStyle::ALL
            .into_iter()
            .filter(|s| *s != PromptStyle::Boxed)
        {
            let m = style.messages("Q", None);
            let tags = style.tags().expect("tag style");
            assert_eq!(m.len(), 2);
            assert_eq!(m[0].role, "system");
            for tag in [
                tags.think_open,
                tags.think_close,
                tags.answer_open,
                tags.answer_close,
            ] {
                assert!(m[0].content.contains(tag), "{} lacks {tag}", style.name());
            }
            assert_eq!(m[1], ChatMessage::new("user", "Q"));
            // An explicit empty system prompt removes the system message.
            assert_eq!(style.messages("Q", Some("")).len(), 1);
            assert_eq!(
                style.messages("Q", Some("Be brief."))[0].content,
                "Be brief."
            );
        }
    }
}
