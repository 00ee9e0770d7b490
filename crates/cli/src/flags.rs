//! Every training setting as an optional flag, generated from the train crate's list of keys so flags and
//! TOML keys never drift apart; a flag given overrides the file.

use factune_train::TrainConfig;

macro_rules! train_overrides {
    ($( $(#[doc = $doc:literal])* $name:ident $(| $alias:literal)? : $ty:ty = $default:expr ),* $(,)?) => {
        /// The training settings as command-line flags (`--learning-rate 1e-4`).
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct TrainOverrides {
            $( $(#[doc = $doc])* #[arg(long, $(alias = $alias,)? help_heading = "Training settings (also TOML keys)")] pub $name: Option<$ty>, )*
        }

        impl TrainOverrides {
            /// Sets every key given as a flag.
            pub fn apply(&self, c: &mut TrainConfig) {
                $( if let Some(v) = &self.$name { c.$name = v.clone(); } )*
            }
        }
    };
}

factune_train::with_train_keys!(train_overrides);

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
