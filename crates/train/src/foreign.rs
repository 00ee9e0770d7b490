//! Keys that users of PEFT's `LoraConfig`, transformers' `TrainingArguments` and TRL's `SFTConfig` write and
//! that factune has under no name. Each is accepted when its value is what factune does anyway, and refused
//! otherwise with what to write instead, so a habit never fails as an "unknown key" nor is silently ignored.
//! Keys factune has under another name are aliases of its own keys (`per_device_train_batch_size`).

use serde_json::Value;

/// Whether a value is one of those factune's behaviour equals.
type Accepts = fn(&Value) -> bool;

fn is_str(v: &Value, names: &[&str]) -> bool {
    v.as_str()
        .is_some_and(|s| names.iter().any(|n| n.eq_ignore_ascii_case(s)))
}

fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// (key, the values accepted, why the others are refused and what to write).
const KEYS: &[(&str, Accepts, &str)] = &[
    // PEFT's LoraConfig / PeftConfig
    ("task_type", |v| v.is_null() || is_str(v, &["CAUSAL_LM"]), "factune trains causal language models: task_type = \"CAUSAL_LM\" or leave it out"),
    ("bias", |v| is_str(v, &["none"]), "factune trains no bias terms: bias = \"none\" is the only value"),
    ("fan_in_fan_out", |v| v == &Value::Bool(false), "not needed: GPT-2's Conv1D weights are transposed when they load; leave it false"),
    ("inference_mode", |v| v == &Value::Bool(false), "a training run trains the adapter; inference_mode = true is for loading one"),
    ("base_model_name_or_path", |_| false, "the base model is --model DIR (factune reads local directories and does not download); remove the key"),
    ("modules_to_save", empty, "not supported yet: factune trains adapters (train_embeddings_and_norms = true trains the embeddings, norms and LM head in full)"),
    // transformers' TrainingArguments and TRL's SFTConfig
    ("logging_steps", |v| v.as_u64() == Some(1), "factune logs every step (metrics.jsonl and the progress line); remove logging_steps"),
    ("eval_strategy", |v| is_str(v, &["steps"]), "factune evaluates every eval_steps steps and at the end: eval_strategy = \"steps\" with eval_steps, or eval_steps = 0 for the end only"),
    ("evaluation_strategy", |v| is_str(v, &["steps"]), "factune evaluates every eval_steps steps and at the end: use eval_steps"),
    ("save_strategy", |v| is_str(v, &["steps"]), "factune checkpoints every save_steps steps: save_strategy = \"steps\" with save_steps, or save_steps = 0 for none"),
    ("greater_is_better", |v| v.is_null() || v == &Value::Bool(false), "the best evaluation is the one with the lowest validation loss (metric_for_best_model = \"eval_loss\")"),
    ("packing", |v| v == &Value::Bool(false), "not supported yet: instruction and chat examples are padded per micro-batch; plain text files are packed"),
    ("optim", |v| is_str(v, &["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"]), "factune's optimizer is AdamW with f32 moments: optim = \"adamw_torch\" (8-bit and other optimizers are not supported)"),
    ("bf16", |v| v == &Value::Bool(false), "compute is f32; base_dtype = \"bfloat16\" holds the frozen weights in bf16"),
    ("fp16", |v| v == &Value::Bool(false), "compute is f32; base_dtype = \"bfloat16\" holds the frozen weights in 16 bits"),
    ("report_to", |v| empty(v) || is_str(v, &["none"]) || v.as_array().is_some_and(|a| a.iter().all(|x| is_str(x, &["none"]))), "factune writes metrics.jsonl and loss.png; report_to = \"none\" (TensorBoard and W&B are not supported)"),
    ("output_dir", |_| false, "the output directory is --output DIR"),
    ("per_device_eval_batch_size", |_| false, "validation runs in micro_batch_size batches; remove the key"),
    ("completion_only_loss", |v| v == &Value::Bool(true), "train_on_prompt = true learns the prompt tokens too"),
    ("assistant_only_loss", |v| v == &Value::Bool(true), "train_on_prompt = true learns every token of a conversation"),
];

/// `None` if `key` is none of these; else `Ok` when the value is accepted, or the reason it is refused.
pub fn check(key: &str, value: &Value) -> Option<Result<(), String>> {
    let (_, accepts, why) = KEYS.iter().find(|(k, _, _)| *k == key)?;
    Some(if accepts(value) {
        Ok(())
    } else {
        Err(format!("`{key} = {value}`: {why}"))
    })
}
