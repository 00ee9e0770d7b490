//! `factune`: fine-tune Hugging Face language models with factorized adapters, on a laptop CPU or a GPU.

mod analyze;
mod bench;
mod commands;
mod compose;
mod evaluate;
mod export;
mod flags;
mod inspect;
mod plot;
mod progress;
mod quickstart;
mod routed;
mod said;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use factune_eval::GenConfig;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "factune",
    version,
    about = "Parameter-efficient fine-tuning of language models (LoRA and friends) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A local Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a Hub id
    /// (`org/name`) already in the local Hugging Face cache
    #[arg(long, value_parser = factune_io::hub::resolve_model)]
    pub model: PathBuf,
    /// A PEFT-format adapter directory to apply (adapter_config.json + adapter_model.safetensors); eval takes
    /// several as NAME=DIR (repeated), each record scored by the one its `adapter` field names
    #[arg(long = "adapter", value_parser = parse_adapter)]
    pub adapters: Vec<AdapterArg>,
    /// Load an adapter even when some of its tensors match no module, or targeted modules lack tensors
    #[arg(long)]
    pub allow_partial: bool,
    /// cpu, or cuda[:N] when built with --features cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hold the base's linear weights in 4-bit NF4 (nf4) or as stored (none). Default: as the adapter was
    /// trained (its run.json), else none. A checkpoint already stored in 4 bits stays 4-bit.
    #[arg(long, value_parser = ["none", "nf4"])]
    pub quantize: Option<String>,
    /// Dtype the base's dense linear weights are held in: float32, or bfloat16 for half the memory (compute
    /// stays f32)
    #[arg(long, value_parser = ["float32", "bfloat16"], default_value = "float32")]
    pub base_dtype: String,
}

/// One `--adapter`: a directory, or `NAME=DIR`.
#[derive(Clone, Debug)]
pub struct AdapterArg {
    pub name: Option<String>,
    pub dir: PathBuf,
}

fn parse_adapter(s: &str) -> Result<AdapterArg, String> {
    match s.split_once('=') {
        // a directory whose name holds `=` stays a directory
        Some((name, dir)) if !name.is_empty() && !name.contains('/') && !Path::new(s).exists() => {
            if dir.is_empty() {
                return Err(format!("`{s}`: expected NAME=DIR"));
            }
            Ok(AdapterArg {
                name: Some(name.to_string()),
                dir: PathBuf::from(dir),
            })
        }
        _ => Ok(AdapterArg {
            name: None,
            dir: PathBuf::from(s),
        }),
    }
}

impl ModelArgs {
    /// The one adapter to apply; several, or named ones, are read by `eval` only.
    pub fn adapter(&self) -> anyhow::Result<Option<&Path>> {
        match self.adapters.as_slice() {
            [] => Ok(None),
            [AdapterArg { name: None, dir }] => Ok(Some(dir)),
            _ => anyhow::bail!(
                "several or named adapters (--adapter NAME=DIR) are read by eval only; give one --adapter DIR"
            ),
        }
    }

    /// The adapters by name, when they are given as NAME=DIR (every one must be).
    pub fn named_adapters(&self) -> anyhow::Result<Option<Vec<(String, PathBuf)>>> {
        if !self.adapters.iter().any(|a| a.name.is_some()) {
            return Ok(None);
        }
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        for a in &self.adapters {
            let Some(n) = &a.name else {
                anyhow::bail!(
                    "--adapter {}: name every adapter (NAME=DIR) when loading several",
                    a.dir.display()
                );
            };
            if out.iter().any(|(m, _)| m == n) {
                anyhow::bail!("--adapter {n}=…: the name `{n}` is given twice");
            }
            out.push((n.clone(), a.dir.clone()));
        }
        Ok(Some(out))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with an adapter and save it in the PEFT format
    Train {
        /// The base model: a local Hugging Face model directory, or a Hub id (`org/name`) already in the
        /// local Hugging Face cache
        #[arg(long, required_unless_present = "print_config", value_parser = factune_io::hub::resolve_model)]
        model: Option<PathBuf>,
        /// Training data: .jsonl, .json, .csv, .tsv, .parquet (or a directory of them) or .txt
        #[arg(long, required_unless_present = "print_config")]
        data: Option<PathBuf>,
        /// TOML file with PEFT/transformers key names (r, lora_alpha, target_modules, learning_rate, …)
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory for the adapter, checkpoints, metrics.jsonl and loss.png
        #[arg(long, required_unless_present = "print_config")]
        output: Option<PathBuf>,
        /// Print the fully resolved config (the TOML file and flags over the defaults) as TOML and exit
        #[arg(long)]
        print_config: bool,
        /// Continue from OUT/checkpoint-N (bit-identical to an uninterrupted run)
        #[arg(long)]
        resume: Option<PathBuf>,
        /// With --resume: let learning_rate, lr_scheduler_type, warmup_steps and warmup_ratio take new values
        /// (later steps follow the new schedule at their step); without it a changed schedule is refused
        #[arg(long, requires = "resume")]
        override_schedule: bool,
        /// Replace an earlier run in --output (its checkpoints, adapter or model, metrics) instead of refusing
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[command(flatten)]
        overrides: Box<flags::TrainOverrides>,
    },
    /// Pre-train a small Llama-architecture model from scratch (tokenizer included)
    Pretrain {
        /// TOML with a [model] table (architecture) and a [training] table (training keys)
        #[arg(long)]
        config: PathBuf,
        /// Corpus: plain text, documents separated by blank lines
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Training keys override the [training] table (full-rank unless peft_type is set: LoRA / ReLoRA)
        #[command(flatten)]
        overrides: Box<flags::TrainOverrides>,
    },
    /// Perplexity (text), multiple-choice accuracy (question/choices/answer JSONL) or exact match (alpaca JSONL)
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        /// auto, perplexity, mc or exact-match
        #[arg(long, default_value = "auto")]
        task: String,
        /// Print one JSON object on stdout
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Evaluate at most N records (0: all)
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Focused prefix tuning: score under log p_specific − α · log p_general, with --adapter the specific
        /// prefix and this the general one (perplexity and exact match)
        #[arg(long)]
        contrast_adapter: Option<PathBuf>,
        /// Focused prefix tuning's α
        #[arg(long, default_value_t = 1.0)]
        contrast_weight: f64,
    },
    /// Generate text (KV-cached; greedy unless --temperature > 0)
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
        prompt: Option<String>,
        /// JSON lines of `prompt` and `adapter` (a name given as --adapter NAME=DIR, or null for the base): each
        /// prompt answered by its adapter, one JSON line out per prompt
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Wrap the prompt as a user message with the tokenizer's chat template
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Focused prefix tuning: the general prefix (a prompt-family adapter trained on all the data) whose
        /// log-probabilities are subtracted from --adapter's (the attribute-specific prefix)
        #[arg(long)]
        contrast_adapter: Option<PathBuf>,
        /// Focused prefix tuning: the weight α of the general prefix, next-token scores log p_specific − α ·
        /// log p_general, re-normalised
        #[arg(long, default_value_t = 1.0)]
        contrast_weight: f64,
    },
    /// Merge an adapter into the base weights and write a full Hugging Face checkpoint
    Merge {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        output: PathBuf,
        /// Compare merged and unmerged logits on a fixed prompt and print the max abs difference
        #[arg(long)]
        verify: bool,
        /// For an adapter trained on a 4-bit base: merge into that base, deq(Q) + ΔW, exactly what was trained
        /// (quantized, the default), or into the full-precision W of --model (original)
        #[arg(long, value_parser = ["quantized", "original"], default_value = "quantized")]
        merge_into: String,
    },
    /// Combine LoRA adapters into one PEFT-format adapter, as PEFT's add_weighted_adapter does (linear, cat,
    /// svd, ties, dare_*, magnitude_prune*)
    MergeAdapters(Box<compose::MergeAdaptersArgs>),
    /// Compose LoRA adapters for a new task from a few examples (LoraHub: weights found by CMA-ES on the
    /// few-shot loss, no gradients)
    Lorahub(Box<compose::LorahubArgs>),
    /// Merge two LoRA adapters with per-column coefficients learned so each keeps its behaviour on its own
    /// data (ZipLoRA)
    Ziplora(Box<compose::ZiploraArgs>),
    /// What fine-tuning did to the weights: update spectra, intruder dimensions
    #[command(subcommand)]
    Analyze(analyze::AnalyzeCommand),
    /// Write a 4-bit NF4 copy of a model in bitsandbytes' layout (train, eval and generate load it directly)
    Quantize {
        /// A local Hugging Face model directory
        dir: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Keep the block scales in f32 (4.5 bits per weight) instead of double-quantising them (≈ 4.127)
        #[arg(long)]
        no_double_quant: bool,
    },
    /// Plot one metric of several runs into a PNG (e.g. validation perplexity of full vs LoRA vs ReLoRA)
    Plot {
        /// Run directories holding metrics.jsonl, as LABEL=DIR or DIR
        #[arg(required = true)]
        runs: Vec<String>,
        /// The metrics.jsonl key to plot
        #[arg(long, default_value = "val_loss")]
        key: String,
        /// Plot e^value (perplexity from a loss)
        #[arg(long)]
        exp: bool,
        #[arg(long, default_value = "factune runs")]
        title: String,
        #[arg(long)]
        output: PathBuf,
    },
    /// Describe a model or adapter directory
    Inspect { dir: PathBuf },
    /// Benchmark pieces used by bench/run.sh (see docs there)
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fine-tune the embedded default model on the embedded task and show before/after
    Quickstart {
        /// Where the adapter and run files go
        #[arg(long, default_value = "runs/quickstart")]
        output: PathBuf,
        /// Directory holding default-model/ and data/ (defaults to the repository's assets/)
        #[arg(long)]
        assets: Option<PathBuf>,
        /// Optimizer steps
        #[arg(long, default_value_t = 150)]
        steps: usize,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Write a random-weight SmolLM2-135M-shaped model directory
    Init {
        #[arg(long)]
        output: PathBuf,
    },
    /// Time LoRA training steps (all-linear) on random tokens; prints one JSON line
    Train {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        opts: bench::TrainOpts,
    },
    /// Time prefill and greedy decode with a merged LoRA adapter on random prompts; prints one JSON line
    Infer {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        opts: bench::InferOpts,
    },
    /// The f32 matmul peak (GFLOP/s) at the 135M model's shapes through candle's gemm; prints one JSON line
    Peak {
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Time the frozen linear (forward and input gradient) with f32 vs NF4 weights at the 135M layer shapes
    Matmul {
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

/// Threading defaults, set once before any tensor op (an explicit environment variable wins):
/// - RAYON_NUM_THREADS: without it candle works out its default (physical cores) by parsing /proc/cpuinfo on
///   every parallel op; in decoding, with hundreds of small ops per token, that cost a quarter of the time
///   (measured: 29 -> 39 tokens/s on the 135M shape).
/// - CANDLE_BARRIER_POOL_SPIN_LIMIT: candle's element-wise worker spins 25,000 times after each op before
///   parking, on a core the gemm threads need; 2,000 measured best (135M step at seq 256 x 4: 2.40 -> 2.22 s,
///   prefill +7%, decode unchanged; docs/performance.md).
fn pin_threading() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000");
    }
}

fn main() {
    pin_threading();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FACTUNE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Every failure exits 1, a bad flag value as much as a bad file (help and --version exit 0).
    let matches = flags::with_defaults(Cli::command())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = matches.unwrap_or_else(|e| {
        let code = if e.use_stderr() { 1 } else { 0 };
        let _ = e.print();
        std::process::exit(code);
    });
    if let Err(e) = on_worker(move || run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs `f` on one of rayon's worker threads, blocking until it returns. The ops parallelise with rayon
/// (gemm, the fused kernels): called from the main thread, each parallel op hands its work to the pool and
/// puts the caller to sleep until a worker wakes it, a futex round trip per op (thousands per training
/// step). From a worker, the caller takes part in the work and only idle workers sleep.
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Deep autograd graphs recurse in candle's backward: give the workers the main thread's stack room.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .build_global();
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train {
            model,
            data,
            config,
            output,
            resume,
            override_schedule,
            overwrite,
            print_config,
            device,
            overrides,
        } => match (model, data, output) {
            (Some(model), Some(data), Some(output)) if !print_config => commands::train(
                &model,
                &data,
                config.as_deref(),
                (&output, overwrite),
                (resume, override_schedule),
                &device,
                &overrides,
            ),
            _ => commands::print_config(config.as_deref(), &overrides),
        },
        Command::Pretrain {
            config,
            data,
            output,
            overrides,
        } => commands::pretrain(&config, &data, &output, &overrides),
        Command::Eval {
            model,
            data,
            task,
            json,
            seq_len,
            batch_size,
            max_new_tokens,
            limit,
            contrast_adapter,
            contrast_weight,
        } => evaluate::eval(
            &model,
            &evaluate::EvalSettings {
                data: &data,
                task: &task,
                as_json: json,
                seq_len,
                batch: batch_size,
                max_new_tokens,
                limit,
                contrast: contrast_adapter.map(|a| (a, contrast_weight)),
            },
        ),
        Command::Generate {
            model,
            prompt,
            prompts,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            contrast_adapter,
            contrast_weight,
        } => {
            let settings = GenConfig {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop_ids: Vec::new(),
            };
            match (prompt, prompts, model.named_adapters()) {
                (_, _, Err(e)) => Err(e),
                (_, Some(_), Ok(None)) if !model.adapters.is_empty() => Err(anyhow::anyhow!(
                    "--prompts chooses adapters by name: give them as --adapter NAME=DIR and name one in each \
                     line's `adapter` field (null for the base)"
                )),
                (_, Some(_), _) if contrast_adapter.is_some() => Err(anyhow::anyhow!(
                    "--contrast-adapter (focused prefix tuning) takes one --prompt, not --prompts"
                )),
                (_, Some(file), Ok(named)) => {
                    routed::generate(&model, &named.unwrap_or_default(), &file, chat, settings)
                }
                (Some(_), None, Ok(Some(_))) => Err(anyhow::anyhow!(
                    "named adapters answer prompts from --prompts FILE (each line's `adapter` picks one); \
                     for one prompt give one --adapter DIR"
                )),
                (Some(p), None, Ok(None)) => evaluate::generate(
                    &model,
                    &p,
                    chat,
                    settings,
                    contrast_adapter.map(|a| (a, contrast_weight)),
                ),
                (None, None, _) => Err(anyhow::anyhow!("give --prompt TEXT or --prompts FILE")),
            }
        }
        Command::Merge {
            mut model,
            output,
            verify,
            merge_into,
        } => {
            if merge_into == "original" {
                model.quantize = Some("none".into());
            }
            export::merge(&model, &output, verify)
        }
        Command::MergeAdapters(args) => compose::merge_adapters(&args),
        Command::Lorahub(args) => compose::lorahub(&args),
        Command::Ziplora(args) => compose::ziplora(&args),
        Command::Analyze(cmd) => analyze::run(&cmd),
        Command::Quantize {
            dir,
            output,
            no_double_quant,
        } => export::quantize(&dir, &output, !no_double_quant),
        Command::Inspect { dir } => inspect::inspect(&dir),
        Command::Plot {
            runs,
            key,
            exp,
            title,
            output,
        } => plot::plot(&runs, &key, exp, &title, &output),
        Command::Bench(BenchCommand::Init { output }) => bench::init(&output),
        Command::Bench(BenchCommand::Train { model, opts }) => bench::train(&model, &opts),
        Command::Bench(BenchCommand::Matmul { tokens, reps }) => bench::matmul(tokens, reps),
        Command::Bench(BenchCommand::Infer { model, opts }) => bench::infer(&model, &opts),
        Command::Bench(BenchCommand::Peak { tokens, reps }) => bench::peak(tokens, reps),
        Command::Quickstart {
            output,
            assets,
            steps,
        } => quickstart::run(&output, assets, steps),
    }
}
