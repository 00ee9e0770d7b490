//! Data formats with the embedded model's tokenizer: which tokens are learned.

use factune_data::{DataFormat, Dataset};
use factune_io::TextTokenizer;
use factune_model::loss::IGNORE_INDEX;
use std::path::PathBuf;

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn learned(tok: &TextTokenizer, ids: &[u32], labels: &[i64]) -> String {
    let kept: Vec<u32> = ids
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l != IGNORE_INDEX)
        .map(|(i, _)| *i)
        .collect();
    tok.decode(&kept).unwrap()
}

#[test]
fn alpaca_learns_only_the_response_and_eos() {
    let tok = TextTokenizer::from_dir(&assets().join("default-model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.jsonl");
    std::fs::write(&f, "{\"instruction\": \"Who has the cup?\", \"input\": \"Tom has a red cup.\", \"output\": \"Tom\"}\n").unwrap();
    let ds = Dataset::load(&f, DataFormat::Auto, &tok, 256, false).unwrap();
    let ex = &ds.examples[0];
    assert_eq!(learned(&tok, &ex.ids, &ex.labels), "Tom");
    assert_eq!(
        *ex.labels.last().unwrap(),
        tok.eos_id().unwrap() as i64,
        "EOS is learned"
    );
    let all = Dataset::load(&f, DataFormat::Alpaca, &tok, 256, true).unwrap();
    assert!(all.examples[0].labels.iter().all(|l| *l != IGNORE_INDEX));
}

#[test]
fn chat_learns_only_assistant_turns() {
    let tok = TextTokenizer::from_dir(&assets().join("default-model")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.jsonl");
    let rec = serde_json::json!({"messages": [
        {"role": "user", "content": "Where is the kite?"},
        {"role": "assistant", "content": "in the park"},
        {"role": "user", "content": "And the ball?"},
        {"role": "assistant", "content": "on the table"}
    ]});
    std::fs::write(&f, format!("{rec}\n")).unwrap();
    let ds = Dataset::load(&f, DataFormat::Auto, &tok, 256, false).unwrap();
    let ex = &ds.examples[0];
    let text = learned(&tok, &ex.ids, &ex.labels);
    assert!(
        text.contains("in the park") && text.contains("on the table"),
        "{text:?}"
    );
    assert!(
        !text.contains("kite") && !text.contains("ball") && !text.contains("user"),
        "{text:?}"
    );
}

#[test]
fn the_shipped_chat_sample_loads() {
    let tok = TextTokenizer::from_dir(&assets().join("default-model")).unwrap();
    let ds = Dataset::load(
        &assets().join("data/chat-sample.jsonl"),
        DataFormat::Auto,
        &tok,
        256,
        false,
    )
    .unwrap();
    assert_eq!(ds.examples.len(), 50);
}
