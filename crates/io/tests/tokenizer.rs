//! A tokenizer.json whose post-processor names an undefined special token is an error naming it, not a
//! panic inside `tokenizers` on the first encode.

use factune_io::TextTokenizer;
use serde_json::{json, Value};
use std::path::PathBuf;

fn with_post_processor(pp: Value) -> (tempfile::TempDir, Result<TextTokenizer, String>) {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/default-model");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    tok["post_processor"] = pp;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let loaded = TextTokenizer::from_dir(dir.path()).map_err(|e| e.to_string());
    (dir, loaded)
}

fn template(special: Value) -> Value {
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": special,
    })
}

#[test]
fn undefined_or_ragged_template_special_tokens_are_errors() {
    let (_d, ok) = with_post_processor(template(
        json!({"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}),
    ));
    let ids = ok.unwrap().encode("hello", true).unwrap();
    assert_eq!(ids[0], 0, "the template's token leads");
    let (_d, e) = with_post_processor(template(json!({})));
    let e = e.err().unwrap();
    assert!(
        e.contains("post_processor.single names the special token `<|endoftext|>`"),
        "{e}"
    );
    let (_d, e) = with_post_processor(json!({"type": "Sequence", "processors": [template(
        json!({"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0, 1], "tokens": ["<|endoftext|>"]}}),
    )]}));
    assert!(e.err().unwrap().contains("one length"));
}

/// `tokenizers` panics building a BPE whose merge's second part is shorter than `continuing_subword_prefix`
/// (found by the fuzz harness); the load is guarded, so it is an error naming the file.
#[test]
fn a_panic_inside_tokenizers_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = json!({
        "version": "1.0",
        "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "##",
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]
        }
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let e = TextTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("cannot be read"),
        "{e}"
    );
}
