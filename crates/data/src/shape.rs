//! Record shapes: what the fields of a record mean. TRL's dataset types (language modelling `text`,
//! `prompt`/`completion`, conversational `messages`, conversational prompt/completion), ShareGPT's
//! `conversations` and alpaca's `instruction`/`input`/`output`. Each record becomes the full text to tokenise
//! and the byte spans that are prompt (not learned), or a question and its expected answer for evaluation.

use crate::source::Record;
use factune_io::{ChatMessage, TextTokenizer};
use serde_json::Value;

type Result<T> = std::result::Result<T, String>;

/// The field names the shapes read: TRL's `dataset_text_field` and the others' PEFT/TRL defaults, each
/// renamable for data whose columns are called something else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub text: String,
    pub prompt: String,
    pub completion: String,
    pub messages: String,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            text: "text".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            messages: "messages".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Plain text: a text file's documents, or a `text` field; every token is learned.
    Text,
    /// `prompt` + `completion` (strings, or lists of chat messages); the completion is learned.
    PromptCompletion,
    /// `messages`: [{role, content}]; assistant turns are learned.
    Chat,
    /// `conversations`: [{from, value}] (ShareGPT); `gpt` turns are learned.
    ShareGpt,
    /// `instruction`, optional `input`, `output`; the output is learned.
    Alpaca,
}

impl Shape {
    /// The shape a record's fields say, checked in order from the most specific.
    pub fn detect(r: &Record, f: &Fields) -> Result<Shape> {
        let has = |k: &str| r.fields.contains_key(k);
        Ok(if has(&f.messages) {
            Shape::Chat
        } else if has("conversations") {
            Shape::ShareGpt
        } else if has(&f.prompt) && has(&f.completion) {
            Shape::PromptCompletion
        } else if has("instruction") && has("output") {
            Shape::Alpaca
        } else if has(&f.text) {
            Shape::Text
        } else {
            let keys: Vec<&str> = r.fields.keys().map(String::as_str).collect();
            return Err(format!(
                "fields [{}] match no record shape: expected `{}` (text), `{}` + `{}`, `{}` (chat), \
                 `conversations` (ShareGPT) or `instruction` + `output` (alpaca); name other fields with \
                 dataset_text_field, prompt_field, completion_field or messages_field",
                keys.join(", "),
                f.text,
                f.prompt,
                f.completion,
                f.messages
            ));
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Shape::Text => "text",
            Shape::PromptCompletion => "prompt/completion",
            Shape::Chat => "chat messages",
            Shape::ShareGpt => "ShareGPT conversations",
            Shape::Alpaca => "alpaca",
        }
    }

    /// The full text of a record and the byte spans of it that are prompt.
    pub fn sample(self, r: &Record, f: &Fields, tok: &TextTokenizer) -> Result<Sample> {
        let eos = tok.eos_token.as_deref().unwrap_or("");
        match self {
            Shape::Text => Ok(Sample {
                full: format!("{}{eos}", string(r, &f.text)?),
                prompt_spans: vec![],
            }),
            Shape::Alpaca => {
                let prompt = alpaca(r)?;
                Ok(Sample {
                    full: format!("{prompt}{}{eos}", string(r, "output")?),
                    prompt_spans: vec![(0, prompt.len())],
                })
            }
            Shape::PromptCompletion => match (field(r, &f.prompt), field(r, &f.completion)) {
                (Value::String(p), Value::String(c)) => Ok(Sample {
                    full: format!("{p}{c}{eos}"),
                    prompt_spans: vec![(0, p.len())],
                }),
                (Value::Array(_), Value::Array(_)) => {
                    let prompt = messages(r, &f.prompt, "role", "content")?;
                    let completion = messages(r, &f.completion, "role", "content")?;
                    let learn_from = prompt.len();
                    chat(&[prompt, completion].concat(), learn_from, tok)
                }
                _ => Err(format!(
                    "`{}` and `{}` must both be strings or both be lists of messages",
                    f.prompt, f.completion
                )),
            },
            Shape::Chat | Shape::ShareGpt => chat(&self.conversation(r, f)?, 0, tok),
        }
    }

    /// The prompt to generate from and the expected answer (exact-match evaluation): alpaca's output, the
    /// completion, or a conversation's last assistant turn after the turns before it.
    pub fn question(self, r: &Record, f: &Fields, tok: &TextTokenizer) -> Result<(String, String)> {
        let last_turn = |msgs: &[ChatMessage]| -> Result<(String, String)> {
            let i = msgs
                .iter()
                .rposition(|m| m.role == "assistant")
                .ok_or("no assistant message holds an answer")?;
            let prompt = tok
                .apply_chat_template(&msgs[..i], true)
                .map_err(|e| e.to_string())?;
            Ok((prompt, msgs[i].content.clone()))
        };
        match self {
            Shape::Text => Err("a text record has no prompt and answer to compare".into()),
            Shape::Alpaca => Ok((alpaca(r)?, string(r, "output")?.to_string())),
            Shape::PromptCompletion => match (field(r, &f.prompt), field(r, &f.completion)) {
                (Value::String(p), Value::String(c)) => Ok((p.clone(), c.clone())),
                _ => {
                    let mut msgs = messages(r, &f.prompt, "role", "content")?;
                    msgs.extend(messages(r, &f.completion, "role", "content")?);
                    last_turn(&msgs)
                }
            },
            Shape::Chat | Shape::ShareGpt => last_turn(&self.conversation(r, f)?),
        }
    }

    fn conversation(self, r: &Record, f: &Fields) -> Result<Vec<ChatMessage>> {
        if self == Shape::Chat {
            return messages(r, &f.messages, "role", "content");
        }
        let mut msgs = Vec::new();
        if let Some(system) = r.fields.get("system") {
            let system = system.as_str().ok_or("`system` must be a string")?;
            if !system.is_empty() {
                msgs.push(ChatMessage {
                    role: "system".into(),
                    content: system.into(),
                });
            }
        }
        for (i, mut m) in messages(r, "conversations", "from", "value")?
            .into_iter()
            .enumerate()
        {
            m.role = match m.role.as_str() {
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" | "chatgpt" => "assistant",
                "system" => "system",
                other => {
                    return Err(format!(
                        "conversations[{i}]: `from` \"{other}\" is not a ShareGPT speaker factune maps (human, gpt, system)"
                    ))
                }
            }
            .into();
            msgs.push(m);
        }
        Ok(msgs)
    }
}

/// What one record tokenises from.
pub struct Sample {
    pub full: String,
    /// Byte spans of `full` that are prompt: their tokens are not learned unless `train_on_prompt`.
    pub prompt_spans: Vec<(usize, usize)>,
}

fn field<'a>(r: &'a Record, k: &str) -> &'a Value {
    r.fields.get(k).unwrap_or(&Value::Null)
}

fn string<'a>(r: &'a Record, k: &str) -> Result<&'a str> {
    match r.fields.get(k) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("`{k}` must be a string")),
        None => Err(format!("missing field `{k}`")),
    }
}

/// The alpaca prompt of a record; LLaMA-Factory's `system` and `history` are refused rather than dropped.
fn alpaca(r: &Record) -> Result<String> {
    for extra in ["system", "history"] {
        let empty = match r.fields.get(extra) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        if !empty {
            return Err(format!(
                "alpaca `{extra}` is not supported: write the record as chat `messages` to keep it"
            ));
        }
    }
    let input = match r.fields.get("input") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s,
        Some(_) => return Err("`input` must be a string".into()),
    };
    Ok(alpaca_prompt(string(r, "instruction")?, input))
}

/// Prompt layout for alpaca records (the Stanford Alpaca template without its preamble).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

/// A list of messages under `key`, each an object with string `role_key` and `content_key`.
fn messages(r: &Record, key: &str, role_key: &str, content_key: &str) -> Result<Vec<ChatMessage>> {
    let list = r
        .fields
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("`{key}` must be a list of messages"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |k: &str| match m.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(format!("{key}[{i}]: `{k}` must be a string")),
                None => Err(format!("{key}[{i}]: missing `{k}`")),
            };
            Ok(ChatMessage {
                role: get(role_key)?,
                content: get(content_key)?,
            })
        })
        .collect()
}

/// A conversation rendered with the tokenizer's chat template; assistant turns from index `learn_from` on are
/// learned. Each turn's span is found by rendering the conversation up to it with and without the generation
/// prompt.
fn chat(messages: &[ChatMessage], learn_from: usize, tok: &TextTokenizer) -> Result<Sample> {
    let learned = |i: usize| i >= learn_from && messages[i].role == "assistant";
    if !(0..messages.len()).any(learned) {
        return Err(if learn_from > 0 {
            "the completion has no assistant message to learn".into()
        } else {
            "conversation has no assistant message to learn".into()
        });
    }
    let render = |upto: usize, gen: bool| {
        tok.apply_chat_template(&messages[..upto], gen)
            .map_err(|e| e.to_string())
    };
    let full = render(messages.len(), false)?;
    let mut prompt_spans = Vec::new();
    let mut cursor = 0;
    for i in (0..messages.len()).filter(|&i| learned(i)) {
        let before = render(i, true)?;
        let through = render(i + 1, false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) {
            return Err("chat_template does not render conversations incrementally; cannot locate assistant turns".into());
        }
        prompt_spans.push((cursor, before.len()));
        cursor = through.len();
    }
    prompt_spans.push((cursor, full.len()));
    Ok(Sample { full, prompt_spans })
}
