//! Chat templates rendered by minijinja match transformers' `apply_chat_template` (jinja2); fixture from
//! scripts/make_chat_fixture.py.

use factune_io::{ChatMessage, TextTokenizer};
use serde_json::Value;
use std::path::PathBuf;

#[test]
fn chat_templates_render_like_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/chat_templates.json")).unwrap(),
    )
    .unwrap();
    let mut tok = TextTokenizer::from_dir(&root.join("assets/default-model")).unwrap();
    tok.bos_token = fx["bos_token"].as_str().map(String::from);
    tok.eos_token = fx["eos_token"].as_str().map(String::from);
    let messages: Vec<ChatMessage> = fx["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    for case in fx["cases"].as_array().unwrap() {
        tok.chat_template = case["template"].as_str().map(String::from);
        let got = tok
            .apply_chat_template(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "template {}",
            case["name"]
        );
    }
}
