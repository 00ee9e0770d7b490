//! `tokenizer.json` plus the bits of `tokenizer_config.json` that matter for training: special tokens and
//! the chat template (rendered with minijinja, as transformers renders it with jinja2).

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Used when a tokenizer ships no `chat_template`: each turn is `<|role|>\ncontent` followed by the EOS
/// token, and a generation prompt opens the assistant turn.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// A `TemplateProcessing` post-processor (alone or in a `Sequence`) must define every special token its
/// templates name, with as many ids as tokens: `tokenizers` checks neither when it reads the file and panics
/// on the first encode.
fn check_post_processor(pp: &Value) -> std::result::Result<(), String> {
    match pp.get("type").and_then(Value::as_str) {
        Some("Sequence") => pp
            .get("processors")
            .and_then(Value::as_array)
            .map_or(Ok(()), |ps| ps.iter().try_for_each(check_post_processor)),
        Some("TemplateProcessing") => {
            let defined = pp.get("special_tokens").and_then(Value::as_object);
            for (name, t) in defined.into_iter().flatten() {
                let len = |k: &str| t.get(k).and_then(Value::as_array).map(Vec::len);
                if len("ids") != len("tokens") {
                    return Err(format!(
                        "post_processor.special_tokens `{name}`: `ids` and `tokens` must be lists of one length"
                    ));
                }
            }
            for part in ["single", "pair"] {
                for piece in pp.get(part).and_then(Value::as_array).into_iter().flatten() {
                    let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) else {
                        continue;
                    };
                    if !defined.is_some_and(|d| d.contains_key(id)) {
                        return Err(format!(
                            "post_processor.{part} names the special token `{id}`, which post_processor.special_tokens does not define"
                        ));
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::invalid(
                &path,
                "missing tokenizer.json (factune needs a fast tokenizer file)",
            ));
        }
        let file: Value = crate::error::read_json(&path)?;
        if let Some(pp) = file.get("post_processor") {
            check_post_processor(pp).map_err(|e| Error::invalid(&path, e))?;
        }
        let inner = crate::error::guarded(&path, || tokenizers::Tokenizer::from_file(&path))?
            .map_err(|e| Error::invalid(&path, format!("cannot load tokenizer: {e}")))?;
        let mut tok = TextTokenizer {
            inner,
            path,
            bos_token: None,
            eos_token: None,
            chat_template: None,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let cfg: Value = crate::error::read_json(&cfg_path)?;
            tok.bos_token = token_string(cfg.get("bos_token"));
            tok.eos_token = token_string(cfg.get("eos_token"));
            tok.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take the default one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            };
        }
        // transformers >= 4.43 may keep the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            tok.chat_template = Some(crate::error::read_to_string(&jinja)?);
        }
        Ok(tok)
    }

    /// The longest token's text in bytes (its vocabulary form, at least the bytes it stands for): a bound on
    /// how much text a number of tokens covers.
    pub fn max_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Token ids and the byte offset where each token starts in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::invalid(&self.path, format!("tokenisation failed: {e}")))?;
        let starts = enc.get_offsets().iter().map(|(s, _)| *s).collect();
        Ok((enc.get_ids().to_vec(), starts))
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::invalid(&self.path, format!("decoding failed: {e}")))
    }

    /// Renders a conversation with the tokenizer's chat template (or [`DEFAULT_CHAT_TEMPLATE`]).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .unwrap_or(DEFAULT_CHAT_TEMPLATE);
        let mut env = minijinja::Environment::new();
        // transformers renders chat templates with trim_blocks and lstrip_blocks on.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::config(format!("minijinja syntax: {e}")))?;
        env.set_syntax(syntax);
        minijinja_contrib_compat(&mut env);
        env.add_template("chat", template).map_err(|e| {
            Error::invalid(&self.path, format!("chat_template does not parse: {e}"))
        })?;
        let ctx = minijinja::context! {
            messages => messages
                .iter()
                .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
                .collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::invalid(&self.path, format!("chat_template failed to render: {e}")))
    }
}

/// The helpers HF chat templates call that jinja2 has and minijinja does not by default.
fn minijinja_contrib_compat(env: &mut minijinja::Environment<'_>) {
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_filter("trim", |s: String| s.trim().to_string());
}
