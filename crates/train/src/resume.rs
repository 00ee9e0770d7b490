//! What a resumed run may change. A checkpoint fixes the run (method, rank, targets, data, seeds, schedule);
//! only its length and its evaluation and checkpoint cadence may be given anew, so a resume never trains
//! something other than what the checkpoint started.

use crate::config::TrainConfig;
use factune_io::{Error, Result};
use serde_json::{Map, Value};

/// Keys a resumed run may set to new values. A longer `max_steps` (or more `num_train_epochs`) extends the
/// run (the learning-rate schedule follows the new length from the checkpoint's step on).
pub const RESUMABLE: &[&str] = &[
    "max_steps",
    "num_train_epochs",
    "eval_steps",
    "save_steps",
    "save_total_limit",
];

/// The learning-rate schedule's keys, which a resume may change only when asked to (`--override-schedule`):
/// the rate at each later step is then the new schedule's value at that step.
pub const SCHEDULE: &[&str] = &[
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
];

/// Whether `key` may change on resume.
fn may_change(key: &str, override_schedule: bool) -> bool {
    RESUMABLE.contains(&key) || (override_schedule && SCHEDULE.contains(&key))
}

fn to_map(c: &TrainConfig) -> Result<Map<String, Value>> {
    match serde_json::to_value(c) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Error::config(
            "the training config does not serialise to an object",
        )),
    }
}

fn show(v: Option<&Value>) -> String {
    v.map_or("unset".into(), Value::to_string)
}

/// The config a resume from a checkpoint `steps` steps in continues with: the checkpoint's `saved` config,
/// with the keys the user `given` (flags, TOML keys) taken from `wanted` where they may change. Any other
/// given key whose value differs is an error that lists every difference; a run with no steps left is one too.
/// `override_schedule` lets the learning-rate schedule's keys change too.
pub fn resumed_config(
    saved: &TrainConfig,
    wanted: &TrainConfig,
    given: &[String],
    steps: usize,
    override_schedule: bool,
) -> Result<TrainConfig> {
    let (s, w) = (to_map(saved)?, to_map(wanted)?);
    let mut out = s.clone();
    let mut diffs = Vec::new();
    for k in given {
        let (a, b) = (s.get(k), w.get(k));
        if a == b {
            continue;
        }
        if may_change(k, override_schedule) {
            if let Some(b) = b {
                out.insert(k.clone(), b.clone());
            }
        } else {
            diffs.push(format!(
                "`{k}`: {} in the checkpoint, {} given",
                show(a),
                show(b)
            ));
        }
    }
    if !diffs.is_empty() {
        return Err(Error::config(format!(
            "cannot resume with changed settings (only {} may change; {} with --override-schedule): {}",
            RESUMABLE.join(", "),
            SCHEDULE.join(", "),
            diffs.join("; ")
        )));
    }
    let mut cfg: TrainConfig = serde_json::from_value(Value::Object(out))
        .map_err(|e| Error::config(format!("resumed config: {e}")))?;
    // new epochs without a new max_steps: the length comes from them again once the data is read
    let has = |k: &str| given.iter().any(|g| g == k);
    if has("num_train_epochs") && !has("max_steps") {
        cfg.max_steps = -1;
    }
    if cfg.max_steps > 0 && cfg.total_steps() <= steps {
        return Err(Error::config(format!(
            "the checkpoint is at step {steps} and max_steps is {}: nothing is left to train; pass \
             --max-steps N with N > {steps} to extend the run",
            cfg.max_steps
        )));
    }
    Ok(cfg)
}

/// Whether `config` is the checkpoint's `saved` one but for the keys that may change; an error listing the
/// differences otherwise (a library caller resuming with another run's settings).
pub fn check_same(
    saved: &TrainConfig,
    config: &TrainConfig,
    override_schedule: bool,
) -> Result<()> {
    let (mut s, mut c) = (to_map(saved)?, to_map(config)?);
    s.retain(|k, _| !may_change(k, override_schedule));
    c.retain(|k, _| !may_change(k, override_schedule));
    let mut keys: Vec<&String> = s.keys().chain(c.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| s.get(*k) != c.get(*k))
        .map(|k| {
            format!(
                "`{k}`: {} in the checkpoint, {}",
                show(s.get(k)),
                show(c.get(k))
            )
        })
        .collect();
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::config(format!(
            "the run's config differs from the checkpoint's: {}",
            diffs.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml: &str) -> TrainConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn only_the_length_and_cadence_change_and_differences_are_listed() {
        let saved = cfg("max_steps = 40\nr = 8");
        let given = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = resumed_config(
            &saved,
            &cfg("max_steps = 80\nr = 8"),
            &given(&["max_steps", "r"]),
            40,
            false,
        )
        .unwrap();
        assert_eq!((c.max_steps, c.r), (80, 8));
        let e = resumed_config(
            &saved,
            &cfg("max_steps = 80\nr = 16\nlearning_rate = 5e-4"),
            &given(&["max_steps", "r", "learning_rate"]),
            40,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`r`: 8 in the checkpoint, 16 given") && e.contains("`learning_rate`"),
            "{e}"
        );
        let e = resumed_config(&saved, &saved, &[], 40, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing is left to train"), "{e}");
        // keys not given keep the checkpoint's values
        let c = resumed_config(&saved, &cfg("r = 16"), &[], 10, false).unwrap();
        assert_eq!(c.r, 8);
        check_same(&saved, &c, false).unwrap();
        assert!(check_same(&saved, &cfg("max_steps = 40\nr = 4"), false).is_err());
        // the schedule changes only when asked to
        let faster = cfg("max_steps = 40\nr = 8\nlearning_rate = 1e-3");
        let lr = given(&["learning_rate"]);
        assert!(resumed_config(&saved, &faster, &lr, 10, false).is_err());
        let c = resumed_config(&saved, &faster, &lr, 10, true).unwrap();
        assert_eq!(c.learning_rate, 1e-3);
        assert!(check_same(&saved, &c, false).is_err());
        check_same(&saved, &c, true).unwrap();
    }
}
