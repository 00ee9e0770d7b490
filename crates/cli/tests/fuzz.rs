//! Mutation fuzzing of every file factune reads, on stable Rust: each target starts from real files (the
//! embedded model, the fixtures), mutates them (bit flips, byte edits, cut/duplicated ranges, numbers replaced
//! by boundary values), and feeds them to the library function a command calls. Errors are the expected
//! outcome; a panic fails the test and the input is kept under `target/fuzz-failures/` to reproduce.
//! An abort (an allocation the machine cannot serve) kills the test binary, which fails it too.
//!
//!     cargo test --release -p factune --test fuzz                      # the CI smoke run
//!     FACTUNE_FUZZ_ITERS=200000 cargo test --release -p factune --test fuzz -- --nocapture
//!
//! `FACTUNE_FUZZ_ITERS` is the number of inputs per target (the default is the smoke run's), and
//! `FACTUNE_FUZZ_SEED` picks another sequence, `FACTUNE_FUZZ_ONLY=data,tokenizer` runs some targets. docs/reliability.md records the long runs.

mod support;

use candle_core::{DType, Device};
use factune_adapters::peft;
use factune_data::{DataOptions, Dataset};
use factune_io::{ModelConfig, TextTokenizer, Weights};
use factune_model::Model;
use factune_train::TrainConfig;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::*;

/// splitmix64: a seeded sequence, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values at the edges of what a field can hold, as text.
const BOUNDARY: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "-0",
    "1e309",
    "-1e309",
    "NaN",
    "nan",
    "inf",
    "1e-320",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "1000000000",
    "1e15",
    "100000",
    "3.5",
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "\"x\"",
    "[0]",
    "[-1]",
    "65536",
];

/// One to four mutations of `seed`; `window` limits byte edits to the first bytes (a binary file's header).
fn mutate(seed: &[u8], rng: &mut Rng, window: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = b.len().min(window).max(1);
        let at = rng.below(span);
        match rng.below(8) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = b"\0\xff\"{}[],:-9.e\n\\"[rng.below(15)];
            }
            2 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at.min(end)..end);
            }
            3 => {
                let end = (at + 1 + rng.below(256)).min(b.len());
                let piece = b[at.min(end)..end].to_vec();
                b.splice(at.min(b.len())..at.min(b.len()), piece);
            }
            4 => {
                let v = BOUNDARY[rng.below(BOUNDARY.len())];
                b.splice(at.min(b.len())..at.min(b.len()), v.bytes());
            }
            5 => b.truncate(rng.below(b.len() + 1)),
            _ => {
                // a number in the text becomes a boundary value
                let starts: Vec<usize> = (0..span.min(b.len()))
                    .filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit()))
                    .collect();
                if let Some(&s) = starts.get(rng.below(starts.len())) {
                    let e = (s..b.len())
                        .find(|&i| !b[i].is_ascii_digit())
                        .unwrap_or(b.len());
                    let v = BOUNDARY[rng.below(BOUNDARY.len())];
                    b.splice(s..e, v.bytes());
                }
            }
        }
    }
    b
}

/// A JSON value with one leaf replaced by a boundary value, one key removed or one array element
/// duplicated: inputs that parse, so the checks behind the parser are reached.
fn mutate_json(v: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::Value;
    let boundary = || -> Vec<Value> {
        BOUNDARY
            .iter()
            .map(|b| serde_json::from_str(b).unwrap_or(Value::String(b.to_string())))
            .chain([
                Value::from(u64::MAX),
                Value::from(i64::MIN),
                Value::from(1u64 << 40),
                Value::from(-1e300),
            ])
            .collect()
    };
    let descend = rng.below(3) != 0;
    match v {
        Value::Object(m) if !m.is_empty() => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            if descend {
                return mutate_json(m.get_mut(&k).unwrap(), rng);
            }
            if rng.below(4) == 0 {
                m.remove(&k);
                return;
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.below(a.len());
            if descend {
                return mutate_json(&mut a[i], rng);
            }
            if rng.below(4) == 0 {
                let x = a[i].clone();
                a.push(x);
                return;
            }
        }
        _ => {}
    }
    let b = boundary();
    *v = b[rng.below(b.len())].clone();
}

/// Half the time a structured mutation of a JSON seed (a safetensors header counts), else byte mutations.
fn mutate_any(seed: &[u8], rng: &mut Rng, window: usize) -> Vec<u8> {
    if rng.below(2) == 0 {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(seed) {
            for _ in 0..1 + rng.below(2) {
                mutate_json(&mut v, rng);
            }
            return serde_json::to_vec_pretty(&v).unwrap();
        }
        if let Some(h) = seed
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        {
            if let Some(Ok(mut v)) = seed
                .get(8..8 + h)
                .map(serde_json::from_slice::<serde_json::Value>)
            {
                mutate_json(&mut v, rng);
                let header = serde_json::to_vec(&v).unwrap();
                let mut out = (header.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(&header);
                out.extend_from_slice(&seed[8 + h..]);
                return out;
            }
        }
        if let Ok(mut t) = std::str::from_utf8(seed).map(|s| s.parse::<toml::Table>()) {
            if let Ok(t) = t.as_mut() {
                let mut v = serde_json::to_value(&*t).unwrap();
                mutate_json(&mut v, rng);
                if let Ok(text) = serde_json::from_value::<toml::Table>(v).map(|t| t.to_string()) {
                    return text.into_bytes();
                }
            }
        }
    }
    mutate(seed, rng, window)
}

fn iterations() -> usize {
    std::env::var("FACTUNE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
/// Whether a target is running: its panics are recorded, others (the test's own assertions) printed.
static IN_TARGET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Feeds mutations of the seeds to `run` (with the seed's index; it writes the input where the target reads it, under
/// the scratch directory, calls it, and says whether the input was read without error). Returns the inputs tried; panics and slow inputs fail the test.
fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    window: usize,
    run: impl Fn(&Path, usize, &[u8]) -> bool,
) -> usize {
    if std::env::var("FACTUNE_FUZZ_ONLY").is_ok_and(|only| !only.split(',').any(|t| t == name)) {
        return 0;
    }
    let seed = std::env::var("FACTUNE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    let mut rng = Rng(seed
        ^ name
            .bytes()
            .fold(0u64, |h, c| h.wrapping_mul(31).wrapping_add(c as u64)));
    let scratch = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut accepted = 0;
    let n = iterations();
    for i in 0..n {
        let input = mutate_any(&seeds[i % seeds.len()], &mut rng, window);
        let dir = scratch.path().join(format!("{}", i % 2));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = Instant::now();
        IN_TARGET.store(true, std::sync::atomic::Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(|| run(&dir, i % seeds.len(), &input)));
        IN_TARGET.store(false, std::sync::atomic::Ordering::SeqCst);
        slowest = slowest.max(t0.elapsed());
        accepted += usize::from(matches!(outcome, Ok(true)));
        if outcome.is_err() {
            let msg = LAST_PANIC.lock().unwrap().take().unwrap_or_default();
            let keep = support::repo().join("target/fuzz-failures");
            std::fs::create_dir_all(&keep).unwrap();
            let file = keep.join(format!("{name}-{i}.bin"));
            std::fs::write(&file, &input).unwrap();
            failures.push(format!("{}: {msg}", file.display()));
        }
    }
    eprintln!(
        "fuzz {name}: {n} inputs ({accepted} read without error), {} panics, slowest {:.2}s",
        failures.len(),
        slowest.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{name}: panics on\n{}",
        failures.join("\n")
    );
    assert!(
        slowest < Duration::from_secs(30),
        "{name}: an input took {slowest:?}"
    );
    n
}

fn quiet_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if IN_TARGET.load(std::sync::atomic::Ordering::SeqCst) {
            *LAST_PANIC.lock().unwrap() = Some(info.to_string());
        } else {
            default(info);
        }
    }));
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fixture(p: &str) -> PathBuf {
    repo().join("tests/fixtures").join(p)
}

/// Links (or copies) every file of `from` but `except` into `to`.
fn populate(from: &Path, to: &Path, except: &str) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if name != except {
            std::os::unix::fs::symlink(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn every_reader_survives_mutated_inputs() {
    quiet_panics();
    let mut total = 0;

    // safetensors headers (names, dtypes, shapes, offsets) of the embedded model
    let st = read(model().join("model.safetensors"));
    let header = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    total += fuzz("safetensors", &[st], header + 64, |dir, _, input| {
        let p = dir.join("model.safetensors");
        std::fs::write(&p, input).unwrap();
        let Ok(w) = Weights::from_files(&[p]) else {
            return false;
        };
        let names: Vec<String> = w.names().map(str::to_string).collect();
        names
            .iter()
            .all(|n| w.get(n, DType::F32, &Device::Cpu).is_ok())
    });

    // config.json of every architecture; the embedded one is also loaded with its weights
    let configs: Vec<Vec<u8>> = ["llama", "gpt2", "qwen2"]
        .iter()
        .map(|a| fixture(a).join("config.json"))
        .filter(|p| p.exists())
        .chain([model().join("config.json")])
        .map(read)
        .collect();
    total += fuzz("config.json", &configs, usize::MAX, |dir, _, input| {
        let p = dir.join("config.json");
        std::fs::write(&p, input).unwrap();
        ModelConfig::from_file(&p).is_ok() && {
            populate(&model(), dir, "config.json");
            Model::load(dir, &Device::Cpu).is_ok()
        }
    });

    // tokenizer.json and tokenizer_config.json, then a text through them
    let toks = vec![
        read(model().join("tokenizer.json")),
        read(model().join("tokenizer_config.json")),
    ];
    total += fuzz("tokenizer", &toks, usize::MAX, |dir, seed, input| {
        let which = ["tokenizer.json", "tokenizer_config.json"][seed];
        populate(&model(), dir, which);
        std::fs::write(dir.join(which), input).unwrap();
        TextTokenizer::from_dir(dir)
            .is_ok_and(|t| t.encode("Hello, world: 1 + 1 = 2", true).is_ok())
    });

    // a PEFT adapter (config, and the weights' header) loaded onto its base
    let lora = fixture("llama-lora");
    let adapter = vec![
        read(lora.join("adapter_config.json")),
        read(lora.join("adapter_model.safetensors")),
    ];
    total += fuzz("adapter", &adapter, 4096, |dir, seed, input| {
        let which = [peft::CONFIG_FILE, peft::WEIGHTS_FILE][seed];
        populate(&lora, dir, which);
        std::fs::write(dir.join(which), input).unwrap();
        let mut m = Model::load(&fixture("llama"), &Device::Cpu).unwrap();
        peft::load(&mut m, dir, false).is_ok()
    });

    // training data in every container and shape
    let tok = TextTokenizer::from_dir(&model()).unwrap();
    let data_seeds: Vec<(String, Vec<u8>)> = [
        "pc.jsonl",
        "pc-array.json",
        "pc.csv",
        "pc.parquet",
        "chat.parquet",
        "sharegpt.parquet",
    ]
    .iter()
    .map(|f| (f.to_string(), read(fixture("data").join(f))))
    .chain([(
        "train.txt".to_string(),
        read(data("quickstart-train.jsonl"))[..4000].to_vec(),
    )])
    .collect();
    let bodies: Vec<Vec<u8>> = data_seeds.iter().map(|(_, b)| b.clone()).collect();
    total += fuzz("data", &bodies, usize::MAX, |dir, seed, input| {
        let p = dir.join(&data_seeds[seed].0); // the seed's own extension
        std::fs::write(&p, input).unwrap();
        Dataset::load(&p, &DataOptions::eval(64), &tok).is_ok()
    });

    // training configs (TOML) through validation and --print-config
    let toml_seed = b"peft_type = \"LORA\"\nr = 8\nlora_alpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
        learning_rate = 2e-4\nmax_steps = 100\nnum_train_epochs = 0\nwarmup_ratio = 0.1\nmicro_batch_size = 4\n\
        gradient_accumulation_steps = 2\nseq_len = 256\nrank_pattern = { v_proj = 4 }\n\
        layers_to_transform = [0, 1]\neval_steps = 10\nsave_steps = 10\nload_best_model_at_end = true\n\
        early_stopping_patience = 2\nquantize = \"none\"\nlr_scheduler_type = \"cosine\"\n"
        .to_vec();
    let vera =
        b"peft_type = \"VERA\"\nr = 256\nprojection_prng_key = 0\nd_initial = 0.1\n".to_vec();
    let mpo =
        b"peft_type = \"MPO\"\nbond_dim = 4\nmpo_modes = 3\ninit_weights = \"dota\"\n".to_vec();
    total += fuzz(
        "train.toml",
        &[toml_seed, vera, mpo],
        usize::MAX,
        |dir, _, input| {
            let p = dir.join("c.toml");
            std::fs::write(&p, input).unwrap();
            TrainConfig::from_toml_file(&p).is_ok_and(|c| {
                c.validate().is_ok() && c.resolved_toml().is_ok() && c.adapter_config().is_ok()
            })
        },
    );

    // trainer_state.json of a real checkpoint, through resume's checks
    let scratch = tempfile::tempdir().unwrap();
    let run = scratch.path().join("run");
    train(&run, "1", &["--save-steps", "1"]);
    let ckpt = run.join("checkpoint-1");
    let state = read(ckpt.join("trainer_state.json"));
    total += fuzz("trainer_state", &[state], usize::MAX, |dir, _, input| {
        populate(&ckpt, dir, "trainer_state.json");
        std::fs::write(dir.join("trainer_state.json"), input).unwrap();
        factune_train::checkpoint_state(dir).is_ok_and(|(saved, steps)| {
            let wanted = TrainConfig {
                max_steps: steps.saturating_add(1).min(i64::MAX as usize) as i64,
                ..TrainConfig::default()
            };
            let given = ["max_steps".to_string()];
            factune_train::resume::resumed_config(&saved, &wanted, &given, steps, false)
                .and_then(|c| c.validate())
                .is_ok()
        })
    });
    eprintln!("fuzz: {total} inputs in all, no panics");
}
