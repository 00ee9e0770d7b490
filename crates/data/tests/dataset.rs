//! Data formats with the embedded model's tokenizer: which tokens are learned.

use factune_data::{DataFormat, DataOptions, Dataset, Shape};
use factune_io::TextTokenizer;
use factune_model::loss::IGNORE_INDEX;
use std::path::PathBuf;

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn opts(format: DataFormat, seq_len: usize, train_on_prompt: bool) -> DataOptions {
    DataOptions {
        format,
        train_on_prompt,
        allow_truncated_labels: false,
        ..DataOptions::eval(seq_len)
    }
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&assets().join("default-model")).unwrap()
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
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.jsonl");
    std::fs::write(&f, "{\"instruction\": \"Who has the cup?\", \"input\": \"Tom has a red cup.\", \"output\": \"Tom\"}\n").unwrap();
    let ds = Dataset::load(&f, &opts(DataFormat::Auto, 256, false), &tok).unwrap();
    let ex = &ds.examples[0];
    assert_eq!(learned(&tok, &ex.ids, &ex.labels), "Tom");
    assert_eq!(
        *ex.labels.last().unwrap(),
        tok.eos_id().unwrap() as i64,
        "EOS is learned"
    );
    let all = Dataset::load(&f, &opts(DataFormat::Alpaca, 256, true), &tok).unwrap();
    assert!(all.examples[0].labels.iter().all(|l| *l != IGNORE_INDEX));
}

#[test]
fn chat_learns_only_assistant_turns() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.jsonl");
    let rec = serde_json::json!({"messages": [
        {"role": "user", "content": "Where is the kite?"},
        {"role": "assistant", "content": "in the park"},
        {"role": "user", "content": "And the ball?"},
        {"role": "assistant", "content": "on the table"}
    ]});
    std::fs::write(&f, format!("{rec}\n")).unwrap();
    let ds = Dataset::load(&f, &opts(DataFormat::Auto, 256, false), &tok).unwrap();
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
    let tok = tokenizer();
    let ds = Dataset::load(
        &assets().join("data/chat-sample.jsonl"),
        &opts(DataFormat::Auto, 256, false),
        &tok,
    )
    .unwrap();
    assert_eq!(ds.examples.len(), 50);
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let f = dir.path().join(name);
    std::fs::write(&f, text).unwrap();
    f
}

fn load_err(f: &std::path::Path, o: &DataOptions) -> String {
    match Dataset::load(f, o, &tokenizer()) {
        Ok(ds) => panic!("{} loaded as {:?}", f.display(), ds.shape),
        Err(e) => e.to_string(),
    }
}

/// The files `datasets` wrote (scripts/make_data_fixtures.py) hold the same three prompt/completion records
/// in five containers; each must give the same examples, learning only the completions.
#[test]
fn datasets_files_in_every_container_give_the_same_examples() {
    let tok = tokenizer();
    let o = opts(DataFormat::Auto, 256, false);
    let reference = Dataset::load(&fixtures().join("pc.jsonl"), &o, &tok).unwrap();
    assert_eq!(reference.shape, Shape::PromptCompletion);
    let answers: Vec<String> = reference
        .examples
        .iter()
        .map(|e| learned(&tok, &e.ids, &e.labels))
        .collect();
    assert_eq!(answers, [" Tom", " in the park", " blue"]);
    let eos = tok.eos_id().unwrap() as i64;
    assert!(reference
        .examples
        .iter()
        .all(|e| *e.labels.last().unwrap() == eos));
    for name in ["pc.parquet", "pc.csv", "pc-array.json"] {
        let ds = Dataset::load(&fixtures().join(name), &o, &tok).unwrap();
        assert_eq!(ds.shape, Shape::PromptCompletion, "{name}");
        assert_eq!(ds.examples, reference.examples, "{name}");
    }
    // The same JSON lines under an unknown extension, and forced.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("pc.jsonl")).unwrap();
    let f = write(&dir, "pc.data", &text);
    assert_eq!(
        Dataset::load(&f, &o, &tok).unwrap().examples,
        reference.examples
    );
    let forced = opts(DataFormat::Jsonl, 256, false);
    let f = write(&dir, "pc.txt", &text);
    assert_eq!(
        Dataset::load(&f, &forced, &tok).unwrap().examples,
        reference.examples
    );
    // ...but `.txt` says text, whatever it holds.
    assert_eq!(Dataset::load(&f, &o, &tok).unwrap().shape, Shape::Text);
}

#[test]
fn nested_parquet_columns_are_chat_and_sharegpt_conversations() {
    let tok = tokenizer();
    let o = opts(DataFormat::Auto, 256, false);
    let chat = Dataset::load(&fixtures().join("chat.parquet"), &o, &tok).unwrap();
    assert_eq!(chat.shape, Shape::Chat);
    let texts: Vec<String> = chat
        .examples
        .iter()
        .map(|e| learned(&tok, &e.ids, &e.labels))
        .collect();
    assert!(
        texts[0].contains("in the park") && !texts[0].contains("kite"),
        "{texts:?}"
    );
    assert!(
        texts[1].contains("Tom") && !texts[1].contains("briefly"),
        "{texts:?}"
    );
    let share = Dataset::load(&fixtures().join("sharegpt.parquet"), &o, &tok).unwrap();
    assert_eq!(share.shape, Shape::ShareGpt);
    // A ShareGPT conversation is the chat conversation with other field names.
    assert_eq!(share.examples[0], chat.examples[0]);
}

#[test]
fn a_save_to_disk_directory_is_refused_with_the_conversion() {
    let e = load_err(
        &fixtures().join("pc-save-to-disk"),
        &opts(DataFormat::Auto, 256, false),
    );
    assert!(
        e.contains("save_to_disk") && e.contains("to_parquet"),
        "{e}"
    );
    // A directory of Parquet files (the Hub's layout) reads them in name order.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    for (i, name) in ["pc.parquet", "chat.parquet"].iter().enumerate() {
        std::fs::copy(
            fixtures().join(name),
            dir.path().join(format!("data/train-{i:05}.parquet")),
        )
        .unwrap();
    }
    let e = load_err(dir.path(), &opts(DataFormat::Auto, 256, false));
    assert!(
        e.contains("train-00001.parquet: row 1") && e.contains("one shape"),
        "{e}"
    );
}

/// Files that used to train as plain text: each is now read as what it is, or refused naming the line.
#[test]
fn the_data_format_comes_from_the_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(DataFormat::Auto, 256, false);
    let rec = r#"{"prompt": "Q:", "completion": " A"}"#;
    let f = write(
        &dir,
        "bad-first.jsonl",
        &format!("{{\"prompt\": \"Q:\"\n{rec}\n"),
    );
    let e = load_err(&f, &o);
    assert!(e.contains("line 1: malformed JSON"), "{e}");
    let f = write(
        &dir,
        "bad-later.jsonl",
        &format!("{rec}\n{rec}\nnot json\n"),
    );
    assert!(load_err(&f, &o).contains("line 3: malformed JSON"));
    let f = write(
        &dir,
        "pretty.jsonl",
        "{\n  \"prompt\": \"Q:\",\n  \"completion\": \" A\"\n}\n",
    );
    let e = load_err(&f, &o);
    assert!(e.contains("one JSON object"), "{e}");
    let f = write(&dir, "mixed.data", &format!("{rec}\nsome prose\n"));
    let e = load_err(&f, &o);
    assert!(
        e.contains("1 of 2 lines are JSON objects but line 2 is not"),
        "{e}"
    );
    let f = write(&dir, "array.jsonl", &format!("[{rec}]\n"));
    assert!(load_err(&f, &o).contains("line 1: a record must be a JSON object, found an array"));
    let f = write(&dir, "ragged.csv", "prompt,completion\nQ:, A\nQ:\n");
    assert!(load_err(&f, &o).contains("line 3: 1 fields, but the header has 2"));
    let f = write(&dir, "x.parquet", "not parquet");
    assert!(load_err(&f, &o).contains("unreadable Parquet file"));
    let f = write(
        &dir,
        "keys.jsonl",
        "{\"question\": \"Q\", \"reply\": \"A\"}\n",
    );
    let e = load_err(&f, &o);
    assert!(
        e.contains("line 1: fields [question, reply] match no record shape"),
        "{e}"
    );
    let f = write(
        &dir,
        "two-shapes.jsonl",
        &format!("{rec}\n{{\"text\": \"hello\"}}\n"),
    );
    assert!(load_err(&f, &o)
        .contains("line 2: a text record, but the first (line 1) is prompt/completion"));
    let f = write(
        &dir,
        "history.jsonl",
        "{\"instruction\": \"I\", \"output\": \"O\", \"history\": [[\"q\", \"a\"]]}\n",
    );
    assert!(load_err(&f, &o).contains("alpaca `history` is not supported"));
    let f = write(&dir, "prose.txt", "hello world\n");
    assert!(load_err(&f, &opts(DataFormat::Chat, 256, false))
        .contains("line 1: not a JSON object, but data_format = \"chat\" reads JSON records"));
}

#[test]
fn renamed_fields_and_text_records() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "q.jsonl",
        "{\"question\": \"Who has the cup?\", \"reply\": \" Tom\"}\n",
    );
    let mut o = opts(DataFormat::Auto, 256, false);
    o.fields.prompt = "question".into();
    o.fields.completion = "reply".into();
    let ds = Dataset::load(&f, &o, &tok).unwrap();
    assert!(learned(&tok, &ds.examples[0].ids, &ds.examples[0].labels).starts_with(" Tom"));
    let f = write(
        &dir,
        "t.jsonl",
        "{\"body\": \"one two three\"}\n{\"body\": \"four\"}\n",
    );
    let mut o = opts(DataFormat::Auto, 256, false);
    o.fields.text = "body".into();
    let ds = Dataset::load(&f, &o, &tok).unwrap();
    assert_eq!(ds.shape, Shape::Text);
    assert_eq!(
        ds.examples.len(),
        2,
        "a text record is one example, not packed with the next"
    );
    assert!(learned(&tok, &ds.examples[0].ids, &ds.examples[0].labels).starts_with("one two three"));
}

/// Answers cut off by seq_len are counted; an example left with no label token is refused unless allowed.
#[test]
fn truncated_labels_are_counted_and_refused_when_nothing_is_left() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let long_prompt = "word ".repeat(40);
    let f = write(
        &dir,
        "t.jsonl",
        &format!(
            "{{\"prompt\": \"Q:\", \"completion\": \" {0}\"}}\n{{\"prompt\": \"{0}\", \"completion\": \" A\"}}\n{{\"prompt\": \"Q:\", \"completion\": \" A\"}}\n",
            long_prompt
        ),
    );
    let e = load_err(&f, &opts(DataFormat::Auto, 16, false));
    assert!(
        e.contains("1 of 3 examples keep no label token at seq_len 16 (line 2)")
            && e.contains("--allow-truncated-labels"),
        "{e}"
    );
    let mut o = opts(DataFormat::Auto, 16, false);
    o.allow_truncated_labels = true;
    let ds = Dataset::load(&f, &o, &tok).unwrap();
    assert_eq!(ds.examples.len(), 2);
    let t = &ds.truncation;
    assert_eq!(
        (t.examples_cut, t.examples_losing_labels, t.examples_skipped),
        (2, 2, 1)
    );
    let full = Dataset::load(&f, &opts(DataFormat::Auto, 256, false), &tok).unwrap();
    assert_eq!(full.truncation.examples_cut, 0);
    assert_eq!(t.label_tokens, full.truncation.label_tokens);
    let kept: usize = ds
        .examples
        .iter()
        .map(|e| {
            e.labels
                .iter()
                .skip(1)
                .filter(|l| **l != IGNORE_INDEX)
                .count()
        })
        .sum();
    assert_eq!(t.label_tokens - t.label_tokens_dropped, kept);
    let line = t.summary(16).unwrap();
    assert!(
        line.contains("2 examples were longer than seq_len 16")
            && line.contains("1 kept no label token"),
        "{line}"
    );
}

/// A record or document far longer than seq_len costs memory for seq_len tokens, not for the whole text, and
/// gives the tokens the whole text gives: a 3 MB completion is cut before tokenising (and counted), a 3 MB
/// text document is tokenised in pieces that join to the whole tokenisation.
#[test]
fn long_records_and_documents_tokenise_in_bounded_memory_with_the_same_tokens() {
    let tok = tokenizer();
    let words = ["alpha", "river", "stone", "light\n", "seven,", "blue"];
    let long: String = (0..500_000)
        .map(|i| words[i % 6])
        .collect::<Vec<_>>()
        .join(" ");
    assert!(long.len() > 3_000_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.jsonl");
    let record = serde_json::json!({"prompt": "Tell me:", "completion": format!(" {long}")});
    std::fs::write(&file, format!("{record}\n")).unwrap();
    let ds = Dataset::load(&file, &opts(DataFormat::Auto, 64, false), &tok).unwrap();
    let whole = tok.encode(&format!("Tell me: {long}"), true).unwrap();
    assert_eq!(ds.examples[0].ids, whole[..64].to_vec());
    assert_eq!(ds.truncation.examples_cut_before_tokenizing, 1);
    assert!(ds
        .truncation
        .summary(64)
        .unwrap()
        .contains("cut before tokenising"));
    let text = dir.path().join("long.txt");
    std::fs::write(&text, &long).unwrap();
    let ds = Dataset::load(&text, &opts(DataFormat::Auto, 64, false), &tok).unwrap();
    let ids: Vec<u32> = ds.examples.iter().flat_map(|e| e.ids.clone()).collect();
    let mut want = tok.encode(&long, true).unwrap();
    want.extend(tok.eos_id());
    assert_eq!(
        ids.len(),
        want.len() / 64 * 64 + usize::from(want.len() % 64 >= 2) * (want.len() % 64)
    );
    assert_eq!(
        ids,
        want[..ids.len()].to_vec(),
        "pieces join to the whole tokenisation"
    );
}

/// Parquet files on which the `parquet` crate asserts (found by the fuzz harness, kept in
/// tests/fixtures/fuzz/) are errors naming the file, not panics.
#[test]
fn corrupt_parquet_files_are_errors() {
    let tok = tokenizer();
    for name in ["parquet-assert.parquet", "parquet-negative-column.parquet"] {
        let p = assets().join("../tests/fixtures/fuzz").join(name);
        let e = Dataset::load(&p, &opts(DataFormat::Auto, 64, false), &tok)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(name) && e.contains("cannot be read"), "{e}");
    }
}
