//! Which method an adapter is and that method's own keys: one variant per method, tagged by PEFT's
//! `peft_type`, each holding the typed config its module declares (PEFT's names and defaults). The adapter
//! file and the training run both go through it; the variant list is also the registry of methods.

use crate::keys::Key;
use crate::registry::Method;
use factune_io::{Error, Result};
use serde::{Deserialize, Serialize};

macro_rules! methods {
    ($( $(#[doc = $doc:literal])* $variant:ident($ty:ty) = $tag:literal => $method:expr ),+ $(,)?) => {
        /// An adapter method with its own settings, written as `"peft_type": "<NAME>"` beside its keys.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "peft_type")]
        pub enum MethodConfig {
            $( $(#[doc = $doc])* #[serde(rename = $tag)] $variant($ty), )+
        }

        impl MethodConfig {
            /// Every method's `peft_type`, in declaration order.
            pub const PEFT_TYPES: &'static [&'static str] = &[$($tag),+];

            pub fn peft_type(&self) -> &'static str {
                match self {
                    $( MethodConfig::$variant(_) => $tag ),+
                }
            }

            /// The method's own keys.
            pub fn keys(&self) -> &'static [Key] {
                match self {
                    $( MethodConfig::$variant(_) => <$ty>::KEYS ),+
                }
            }

            /// Every method's own keys, by `peft_type`.
            pub const ALL_KEYS: &'static [(&'static str, &'static [Key])] = &[$( ($tag, <$ty>::KEYS) ),+];

            /// The method's implementation.
            pub fn method(&self) -> &'static dyn Method {
                match self {
                    $( MethodConfig::$variant(_) => &$method ),+
                }
            }
        }

        /// The implementations, for lookup by name.
        pub(crate) const METHODS: &[&dyn Method] = &[$( &$method ),+];

        $(
            impl From<$ty> for MethodConfig {
                fn from(c: $ty) -> Self {
                    MethodConfig::$variant(c)
                }
            }

            impl<'a> TryFrom<&'a MethodConfig> for &'a $ty {
                type Error = Error;
                fn try_from(m: &'a MethodConfig) -> Result<&'a $ty> {
                    match m {
                        MethodConfig::$variant(c) => Ok(c),
                        #[allow(unreachable_patterns)]
                        other => Err(Error::config(format!(
                            "a {} adapter was given the settings of a {} adapter",
                            $tag,
                            other.peft_type()
                        ))),
                    }
                }
            }
        )+
    };
}

methods! {
    /// LoRA and its variants chosen by the shared keys (rsLoRA, DoRA, PiSSA, EVA, LoftQ).
    Lora(crate::lora::LoraOptions) = "LORA" => crate::lora::LoraMethod,
    /// Tensor-train (matrix product operator) adapters: DoTA, QDoTA.
    Mpo(crate::mpo::MpoConfig) = "MPO" => crate::mpo::MpoMethod,
    Vera(crate::vera::VeraConfig) = "VERA" => crate::vera::VeraMethod,
    /// Sparse + low-rank.
    Rosa(crate::rosa::RosaConfig) = "ROSA" => crate::rosa::RosaMethod,
    MultiLora(crate::multilora::MultiLoraConfig) = "MULTILORA" => crate::multilora::MultiLoraMethod,
    Glora(crate::glora::GloraConfig) = "GLORA" => crate::glora::GloraMethod,
    AdaLora(crate::adalora::AdaLoraConfig) = "ADALORA" => crate::adalora::AdaLoraMethod,
    /// Structure-aware intrinsic dimension: one θ projected into every layer (Fastfood).
    Said(crate::said::SaidConfig) = "SAID" => crate::said::SaidMethod,
    /// Virtual input embeddings (the prompt family).
    PromptTuning(crate::prompt_tuning::PromptTuningConfig) = "PROMPT_TUNING" => crate::prompt_tuning::PromptTuningMethod,
    /// Virtual input embeddings from an MLP prompt encoder.
    PTuning(crate::p_tuning::PTuningConfig) = "P_TUNING" => crate::p_tuning::PTuningMethod,
    /// Per-layer key/value prefixes.
    PrefixTuning(crate::prefix_tuning::PrefixTuningConfig) = "PREFIX_TUNING" => crate::prefix_tuning::PrefixTuningMethod,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig::Lora(Default::default())
    }
}

impl MethodConfig {
    /// The method called `peft_type` with its keys at their defaults; an unknown name lists the known ones.
    pub fn named(peft_type: &str) -> Result<Self> {
        if !Self::PEFT_TYPES.contains(&peft_type) {
            return Err(Error::config(format!(
                "unknown adapter method peft_type `{peft_type}`; supported: {}",
                Self::PEFT_TYPES.join(", ")
            )));
        }
        serde_json::from_value(serde_json::json!({ "peft_type": peft_type }))
            .map_err(|e| Error::config(format!("peft_type `{peft_type}`: {e}")))
    }

    /// The default of each of this method's keys, as written in files (`null` for an unset option).
    pub fn defaults(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.remove("peft_type");
                m
            }
            _ => Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_round_trips_by_name_with_its_defaults() {
        for &name in MethodConfig::PEFT_TYPES {
            let m = MethodConfig::named(name).unwrap();
            assert_eq!(m.peft_type(), name);
            assert_eq!(m.method().peft_type(), name);
            let back: MethodConfig =
                serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
            assert_eq!(back, m);
        }
        let e = MethodConfig::named("LORAX").unwrap_err().to_string();
        assert!(e.contains("LORAX") && e.contains("VERA"), "{e}");
    }
}
