//! What a run trains, as `peft_type` names it: an adapter method by PEFT's name, every weight (`full`), or
//! Online-LoRA's stream of LoRA pairs (`online_lora`). A closed set, parsed once (case-insensitively) where
//! the TOML file or the flag is read, so an unknown name fails there with the known ones listed.

use factune_adapters::MethodConfig;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftType {
    /// An adapter method, by its `peft_type` (one of `MethodConfig::PEFT_TYPES`).
    Adapter(&'static str),
    Full,
    OnlineLora,
}

impl PeftType {
    pub const LORA: PeftType = PeftType::Adapter("LORA");

    /// The adapter method the run attaches: Online-LoRA trains LoRA pairs, and a full run gets LoRA's
    /// config, which it never attaches.
    pub fn adapter(self) -> &'static str {
        match self {
            PeftType::Adapter(name) => name,
            PeftType::Full | PeftType::OnlineLora => "LORA",
        }
    }
}

impl FromStr for PeftType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("full") {
            return Ok(PeftType::Full);
        }
        if s.eq_ignore_ascii_case("online_lora") {
            return Ok(PeftType::OnlineLora);
        }
        MethodConfig::PEFT_TYPES
            .iter()
            .find(|n| n.eq_ignore_ascii_case(s))
            .map(|n| PeftType::Adapter(n))
            .ok_or_else(|| {
                format!(
                    "unknown adapter method peft_type `{}`; supported: {}, full, online_lora",
                    s.to_uppercase(),
                    MethodConfig::PEFT_TYPES.join(", ")
                )
            })
    }
}

impl fmt::Display for PeftType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeftType::Adapter(name) => name,
            PeftType::Full => "full",
            PeftType::OnlineLora => "online_lora",
        })
    }
}

impl Serialize for PeftType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PeftType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_print_as_written_in_files() {
        assert_eq!(
            "vera".parse::<PeftType>().unwrap(),
            PeftType::Adapter("VERA")
        );
        assert_eq!("FULL".parse::<PeftType>().unwrap(), PeftType::Full);
        assert_eq!(PeftType::OnlineLora.to_string(), "online_lora");
        assert_eq!(PeftType::OnlineLora.adapter(), "LORA");
        let e = "lorax".parse::<PeftType>().unwrap_err();
        assert!(
            e.contains("LORAX") && e.contains("VERA") && e.contains("online_lora"),
            "{e}"
        );
    }
}
