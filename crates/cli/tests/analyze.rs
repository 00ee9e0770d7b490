//! `factune analyze` through the CLI on runs trained on the embedded model: a LoRA adapter and a full
//! fine-tune, their spectra and intruder dimensions, the reduced copies, and bad input refused.

mod support;

use std::path::Path;
use support::*;

fn read(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn analyze_args<'a>(
    what: &'a str,
    m: &'a Path,
    tuned: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "analyze",
        what,
        "--model",
        s(m),
        "--tuned",
        s(tuned),
        "--output",
        s(out),
    ];
    args.extend_from_slice(extra);
    args
}

/// `analyze WHAT` of `tuned` against the embedded model, which must succeed; its output.
fn analyze(what: &str, tuned: &Path, out: &Path, extra: &[&str]) -> String {
    ok(&analyze_args(what, &model(), tuned, out, extra))
}

#[test]
fn lora_and_full_fine_tuning_analysed_and_reduced() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, full) = (dir.path().join("lora"), dir.path().join("full"));
    train(&lora, "40", &[]);
    // a full fine-tune writes a whole model
    train(&full, "20", &["--peft-type", "full"]);
    assert!(full.join("model.safetensors").exists() && full.join("config.json").exists());

    let s_lora = dir.path().join("s-lora");
    let said = analyze("spectrum", &lora, &s_lora, &[]);
    assert!(said.contains("updated layers"), "{said}");
    let j = read(&s_lora.join("spectrum.json"));
    let modules = j["modules"].as_array().unwrap();
    // q_proj, v_proj, down_proj in each of the embedded model's layers, each a rank-4 update
    assert!(!modules.is_empty() && modules.len().is_multiple_of(3));
    for m in modules {
        assert_eq!(m["rank"], 4, "{m}");
        assert_eq!(m["singular_values"].as_array().unwrap().len(), 4);
        let energy = m["energy_at_rank"].as_array().unwrap();
        assert!((energy[3].as_f64().unwrap() - 1.0).abs() < 1e-9);
    }
    assert!(s_lora.join("spectrum.png").exists());

    let s_full = dir.path().join("s-full");
    analyze("spectrum", &full, &s_full, &["--ranks", "8"]);
    let j = read(&s_full.join("spectrum.json"));
    // every linear layer changed, at full rank (a full-rank update is not low-rank)
    assert!(j["modules"].as_array().unwrap().len() > modules.len());
    assert!(j["modules"][0]["rank"].as_u64().unwrap() > 8);

    let i_lora = dir.path().join("i-lora");
    analyze("intruders", &lora, &i_lora, &["--sweep", "--reduce", "0.0"]);
    let j = read(&i_lora.join("intruders.json"));
    let total = j["intruders"].as_u64().unwrap();
    let sweep = j["sweep"].as_array().unwrap();
    let counts: Vec<u64> = sweep
        .iter()
        .map(|p| p["intruders"].as_u64().unwrap())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "monotone in ε: {counts:?}"
    );
    assert!(i_lora.join("intruders-sweep.png").exists());
    // the reduced copy is a LoRA adapter; with λ = 0 its layers hold no intruders left at that ε
    assert!(i_lora.join("adapter_model.safetensors").exists());
    if total > 0 {
        let again = dir.path().join("i-again");
        analyze("intruders", &i_lora, &again, &[]);
        let after = read(&again.join("intruders.json"))["intruders"]
            .as_u64()
            .unwrap();
        assert!(after < total, "{after} intruders after removing {total}");
    }

    let i_full = dir.path().join("i-full");
    analyze("intruders", &full, &i_full, &["--reduce", "0.5"]);
    assert!(i_full.join("model.safetensors").exists() && i_full.join("config.json").exists());
    // the reduced full model still loads and evaluates
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "a pen is used for writing.\n").unwrap();
    ok(&eval_args(&i_full, None, &text, &["--json"]));
}

/// `analyze WHAT`, which must fail; its message.
fn refused(what: &str, m: &Path, tuned: &Path, out: &Path, extra: &[&str]) -> String {
    fails(&analyze_args(what, m, tuned, out, extra))
}

#[test]
fn bad_input_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let fx = repo().join("tests/fixtures");
    let o = dir.path().join("o");
    // another architecture as the tuned model
    let e = refused("intruders", &model(), &fx.join("gpt2"), &o, &[]);
    assert!(
        e.contains("not the base's architecture") || e.contains("shape"),
        "{e}"
    );
    // a prompt-tuning adapter has no weight update
    let e = refused(
        "spectrum",
        &fx.join("llama"),
        &fx.join("llama-prompt"),
        &o,
        &[],
    );
    assert!(e.contains("virtual tokens"), "{e}");
    // neither an adapter nor a model
    let e = refused("spectrum", &model(), dir.path(), &o, &[]);
    assert!(e.contains("neither an adapter"), "{e}");
    // the base itself: nothing changed
    let e = refused("intruders", &model(), &model(), &o, &[]);
    assert!(e.contains("no update"), "{e}");
    for (flag, v, says) in [
        ("--epsilon", "1.5", "outside (0, 1]"),
        ("--reduce", "2", "outside [0, 1]"),
        ("--top-k", "0", "at least 1"),
    ] {
        let lora = fx.join("llama-intruders");
        let e = refused("intruders", &fx.join("llama"), &lora, &o, &[flag, v]);
        assert!(e.contains(says), "{flag} {v}: {e}");
    }
}
