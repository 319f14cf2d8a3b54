//! Text <-> token ids. A thin wrapper over the `tokenizers` crate: loaded from a Hugging Face
//! `tokenizer.json`, or rebuilt from the vocabulary, merges and token types stored in GGUF
//! metadata (byte-level BPE, digits split one by one, control tokens special).

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{Error, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A tokenizer with the engine's error handling.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer",
                hint: "a Hugging Face model folder needs tokenizer.json",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::bad_file(path, "tokenizer.json", e))?;
        Ok(Self { inner })
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    /// `pre` is `tokenizer.ggml.pre`: `smollm` (every digit split, then GPT-2's regex) and plain
    /// `gpt2`/`default` are rebuilt; other pre-tokenizers (llama-bpe, qwen2, ...) use regexes of
    /// their own and are refused rather than silently tokenized differently.
    pub fn from_gguf_bpe(
        path: &Path,
        tokens: &[String],
        merges: &[String],
        token_types: &[i32],
        pre: &str,
    ) -> Result<Self> {
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                Error::bad_file(
                    path,
                    "tokenizer.ggml.merges",
                    format!("merge {i} '{m}' has no space"),
                )
            })?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .build()
            .map_err(|e| Error::bad_file(path, "tokenizer.ggml.merges", e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            "gpt2" | "default" => byte_level.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            other => {
                return Err(Error::BadConfig {
                    path: path.to_path_buf(),
                    key: "tokenizer.ggml.pre".into(),
                    reason: format!(
                        "pre-tokenizer '{other}' cannot be rebuilt from GGUF yet (supported: smollm, gpt2); \
                         use the model's Hugging Face folder, which has tokenizer.json"
                    ),
                })
            }
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(token_types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(token_types)
            .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| Error::bad_file(path, "tokenizer.ggml.tokens", e))?;
        inner
            .add_tokens(user)
            .map_err(|e| Error::bad_file(path, "tokenizer.ggml.tokens", e))?;
        Ok(Self { inner })
    }

    /// Encodes text without adding BOS/EOS (special tokens written in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; `skip_special` drops control tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Id of a token given by its text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes it as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, true)
            .map_err(|e| Error::bad_file(path, "tokenizer.json (write)", e))
    }

    /// Text of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
