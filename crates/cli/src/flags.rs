//! Every training setting as an optional flag, generated from the train crate's list of keys and the methods'
//! config structs, so flags and TOML keys never drift apart; a flag given overrides the file.

use factune_adapters::keys::Key;
use factune_adapters::MethodConfig;
use factune_train::TrainConfig;
use serde_json::Value;
use std::collections::BTreeMap;

macro_rules! train_overrides {
    ($( $(#[doc = $doc:literal])* $name:ident $(| $alias:literal)* : $ty:ty = $default:expr ),* $(,)?) => {
        /// The training settings as command-line flags (`--learning-rate 1e-4`).
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct TrainOverrides {
            $( $(#[doc = $doc])* #[arg(long, allow_negative_numbers = true, $(alias = $alias,)* help_heading = "Training settings (also TOML keys)")] pub $name: Option<$ty>, )*
            #[command(flatten)]
            pub method: MethodFlags,
        }

        impl TrainOverrides {
            /// Sets every key given as a flag.
            pub fn apply(&self, c: &mut TrainConfig) {
                $( if let Some(v) = &self.$name { c.$name = v.clone(); } )*
                c.method_keys.0.extend(self.method.0.clone());
            }

            /// The keys given as flags.
            pub fn given(&self) -> Vec<String> {
                let mut keys = Vec::new();
                $( if self.$name.is_some() { keys.push(stringify!($name).to_string()); } )*
                keys.extend(self.method.0.keys().cloned());
                keys
            }
        }
    };
}

factune_train::with_train_keys!(train_overrides);

/// Appends each training flag's default to its help (`[default: 0.0002]`), read from
/// `TrainConfig::default()` so the help cannot disagree with what a run uses.
pub fn with_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = serde_json::to_value(TrainConfig::default()).unwrap_or_default();
    let shown = |v: &Value| match v {
        Value::String(s) if s.is_empty() => "none".into(),
        Value::Array(a) if a.is_empty() => "none".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or(x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(o) if o.is_empty() => "none".into(),
        other => other.to_string(),
    };
    let add = |sub: clap::Command| {
        let mut sub = sub;
        for key in TrainConfig::KEYS {
            if sub.get_arguments().any(|a| a.get_id() == *key) {
                let default = shown(&defaults[*key]);
                sub = sub.mut_arg(*key, |a| {
                    let help = a.get_help().map(ToString::to_string).unwrap_or_default();
                    a.help(format!("{help} [default: {default}]"))
                });
            }
        }
        sub
    };
    cmd.mut_subcommand("train", add)
        .mut_subcommand("pretrain", add)
}

/// The methods' own keys as flags (`--bond-dim 4`, `--d-initial 0.2`), built from each method's config
/// struct: a method's keys and their help are declared once, in its module.
#[derive(Debug, Clone, Default)]
pub struct MethodFlags(pub BTreeMap<String, Value>);

/// Each method key once (a key two methods share, such as `init_weights`, is one flag), with whether every
/// method that has it takes a string (then a flag's value is kept as written) and its defaults.
fn method_keys() -> Vec<(Key, bool, Vec<String>)> {
    let mut out: Vec<(Key, bool, Vec<String>)> = Vec::new();
    for &(peft_type, keys) in MethodConfig::ALL_KEYS {
        let defaults = MethodConfig::named(peft_type)
            .map(|m| m.defaults())
            .unwrap_or_default();
        for k in keys {
            let default = defaults.get(k.name).cloned().unwrap_or(Value::Null);
            match out.iter_mut().find(|(o, _, _)| o.name == k.name) {
                Some((_, s, d)) => {
                    *s &= default.is_string();
                    d.push(format!("{default} ({peft_type})"));
                }
                None => out.push((*k, default.is_string(), vec![default.to_string()])),
            }
        }
    }
    out
}

/// A flag's value as the key's JSON value: text for string keys, else a bool or number when it reads as one.
fn flag_value(text: &str, string: bool) -> Value {
    if string {
        return Value::String(text.into());
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => text
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| text.parse::<i64>().map(Value::from))
            .or_else(|_| text.parse::<f64>().map(Value::from))
            .unwrap_or_else(|_| Value::String(text.into())),
    }
}

impl clap::FromArgMatches for MethodFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut out = BTreeMap::new();
        for (k, string, _) in method_keys() {
            if let Some(v) = m.get_one::<String>(k.name) {
                out.insert(k.name.to_string(), flag_value(v, string));
            }
        }
        Ok(MethodFlags(out))
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.extend(Self::from_arg_matches(m)?.0);
        Ok(())
    }
}

impl clap::Args for MethodFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd;
        for (k, _, mut defaults) in method_keys() {
            if defaults.len() > 1 {
                // name the first method too
                let owner = MethodConfig::ALL_KEYS
                    .iter()
                    .find(|(_, keys)| keys.contains(&k))
                    .map_or("", |(t, _)| t);
                defaults[0] = format!("{} ({owner})", defaults[0]);
            }
            let long = |n: &str| n.replace('_', "-");
            let mut arg = clap::Arg::new(k.name)
                .long(long(k.name))
                .value_name(k.name.to_uppercase())
                .help(format!(
                    "{} [default: {}]",
                    k.doc.trim(),
                    defaults.join(", ")
                ))
                .help_heading("Method settings (also TOML keys)");
            for a in k.aliases {
                arg = arg.alias(long(a));
            }
            if long(k.name) != k.name {
                arg = arg.alias(k.name);
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use factune_train::config::Targets;

    #[test]
    fn toml_keys_and_overrides() {
        let mut c: TrainConfig = toml::from_str(
            "r = 16\ntarget_modules = [\"q_proj\", \"k_proj\"]\nlearning_rate = 1e-3",
        )
        .unwrap();
        assert_eq!(c.r, 16);
        assert_eq!(
            c.target_modules,
            Targets::List(vec!["q_proj".into(), "k_proj".into()])
        );
        let o = TrainOverrides {
            r: Some(4),
            target_modules: Some("all-linear".parse().unwrap()),
            ..Default::default()
        };
        o.apply(&mut c);
        assert_eq!(c.r, 4);
        assert_eq!(c.target_modules, Targets::One("all-linear".into()));
        assert_eq!(c.learning_rate, 1e-3);
    }
}
