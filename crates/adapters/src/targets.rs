//! Which linear layers an adapter wraps, with PEFT's matching rules.

use crate::config::{AdapterConfig, TargetModules};
use factune_io::{Error, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeSet;

/// PEFT: a listed name matches a module whose path equals it or ends with `.name`; a string is a regex that
/// must match the whole path; `all-linear` is every linear layer but the output head. `exclude_modules` (the
/// same two forms) removes modules first; `layers_to_transform` keeps, of the modules a list matched by
/// suffix, those whose layer index (the number after `layers_pattern`, or after any name) it holds.
pub struct TargetMatcher {
    list: Option<Vec<String>>,
    regex: Option<Regex>,
    all: bool,
    exclude: Option<Box<TargetMatcher>>,
    layers: Option<(BTreeSet<usize>, Vec<Regex>)>,
}

/// An int or a list of ints (PEFT's `layers_to_transform`); `None` for null or an empty list.
pub fn layer_indexes(v: Option<&Value>) -> Result<Option<BTreeSet<usize>>> {
    let bad = || Error::config("`layers_to_transform` must be a layer index or a list of them");
    let ints = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().ok_or_else(bad))
            .collect::<Result<Vec<_>>>()?,
        Some(x) => vec![x.as_u64().ok_or_else(bad)?],
    };
    Ok((!ints.is_empty()).then(|| ints.into_iter().map(|i| i as usize).collect()))
}

/// PEFT's `layers_pattern`: a name or a list of names; none means any name.
fn layer_patterns(v: Option<&Value>) -> Result<Vec<String>> {
    let bad = || Error::config("`layers_pattern` must be a name or a list of names");
    Ok(match v {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) if s.is_empty() => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad()),
    })
}

impl TargetMatcher {
    /// The modules an adapter config selects: its targets, exclusions and layer indexes.
    pub fn for_config(cfg: &AdapterConfig) -> Result<Self> {
        let mut m = Self::new(&cfg.target_modules)?;
        if let Some(e) = cfg
            .exclude_modules
            .as_ref()
            .filter(|e| !matches!(e, TargetModules::List(l) if l.is_empty()))
        {
            let mut e = Self::new(e)?;
            e.all = false; // `all-linear` is no exclusion name
            m.exclude = Some(Box::new(e));
        }
        let patterns = layer_patterns(cfg.layers_pattern.as_ref())?;
        if let Some(idx) = layer_indexes(cfg.layers_to_transform.as_ref())? {
            if m.regex.is_some() {
                return Err(Error::config(
                    "`layers_to_transform` cannot be used when target_modules is a regex (as in PEFT): put the \
                     layers in the regex, or list the module names",
                ));
            }
            let res = if patterns.is_empty() {
                vec![Regex::new(r"^.*\.[^.]*\.(\d+)\.").expect("fixed regex")]
            } else {
                patterns
                    .iter()
                    .map(|p| {
                        Regex::new(&format!(r"^.*\.{p}\.(\d+)\."))
                            .map_err(|e| Error::config(format!("`layers_pattern` `{p}`: {e}")))
                    })
                    .collect::<Result<_>>()?
            };
            m.layers = Some((idx, res));
        } else if !patterns.is_empty() {
            return Err(Error::config(
                "`layers_pattern` names where the layer index is; it needs layers_to_transform",
            ));
        }
        Ok(m)
    }

    pub fn new(t: &TargetModules) -> Result<Self> {
        Ok(match t {
            TargetModules::Pattern(p) if p == "all-linear" => TargetMatcher {
                list: None,
                regex: None,
                all: true,
                exclude: None,
                layers: None,
            },
            TargetModules::Pattern(p) => TargetMatcher {
                list: None,
                regex: Some(
                    Regex::new(&format!("^(?:{p})$"))
                        .map_err(|e| Error::config(format!("target_modules regex `{p}`: {e}")))?,
                ),
                all: false,
                exclude: None,
                layers: None,
            },
            TargetModules::List(l) => TargetMatcher {
                list: Some(l.clone()),
                regex: None,
                all: false,
                exclude: None,
                layers: None,
            },
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(path)) {
            return false;
        }
        if let Some(re) = &self.regex {
            return re.is_match(path);
        }
        // a path listed whole is taken as it is (PEFT); suffixes and all-linear go through the layer filter
        if self
            .list
            .as_ref()
            .is_some_and(|l| l.iter().any(|t| path == t))
        {
            return true;
        }
        let found = self.all
            || self
                .list
                .as_ref()
                .is_some_and(|l| l.iter().any(|t| path.ends_with(&format!(".{t}"))));
        match &self.layers {
            Some((idx, res)) if found => res
                .iter()
                .find_map(|re| re.captures(path))
                .and_then(|c| c[1].parse::<usize>().ok())
                .is_some_and(|i| idx.contains(&i)),
            _ => found,
        }
    }

    /// Errors when a listed name matches nothing, naming the module names the model has.
    pub fn check_all_used(&self, paths: &[&str]) -> Result<()> {
        let available: BTreeSet<&str> = paths.iter().filter_map(|p| p.rsplit('.').next()).collect();
        let avail = available.into_iter().collect::<Vec<_>>().join(", ");
        if let Some(l) = &self.list {
            for t in l {
                if !paths
                    .iter()
                    .any(|p| *p == t || p.ends_with(&format!(".{t}")))
                {
                    return Err(Error::config(format!(
                        "target module `{t}` matches no linear layer of this model; available: {avail} (or all-linear)"
                    )));
                }
            }
        }
        if !paths.iter().any(|p| self.matches(p)) {
            let filtered = if self.exclude.is_some() || self.layers.is_some() {
                " once exclude_modules and layers_to_transform apply"
            } else {
                ""
            };
            return Err(Error::config(format!(
                "target_modules match no linear layer of this model{filtered}; available: {avail} (or all-linear)"
            )));
        }
        Ok(())
    }
}

/// PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matches a module path ending in `.key` (or equal), as
/// a regex anchored at a dot boundary.
pub fn pattern_lookup<'a, T>(
    patterns: &'a std::collections::BTreeMap<String, T>,
    path: &str,
) -> Option<&'a T> {
    patterns.iter().find_map(|(k, v)| {
        Regex::new(&format!(r"^(.*\.)?(?:{k})$"))
            .ok()
            .filter(|re| re.is_match(path))
            .map(|_| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_suffix_regex_and_all_linear() {
        let m = TargetMatcher::new(&TargetModules::List(vec!["q_proj".into(), "c_proj".into()]))
            .unwrap();
        assert!(m.matches("model.layers.0.self_attn.q_proj"));
        assert!(!m.matches("model.layers.0.self_attn.qq_proj"));
        assert!(m.matches("transformer.h.1.mlp.c_proj"));
        let m = TargetMatcher::new(&TargetModules::Pattern(r".*\.0\..*(q|v)_proj".into())).unwrap();
        assert!(m.matches("model.layers.0.self_attn.v_proj"));
        assert!(!m.matches("model.layers.1.self_attn.v_proj"));
        let m = TargetMatcher::new(&TargetModules::Pattern("all-linear".into())).unwrap();
        assert!(m.matches("model.layers.3.mlp.down_proj"));
    }

    /// PEFT's rules (tuners_utils.check_target_module_exists): exclusions first, the layer index after the
    /// pattern (or after any name), paths listed whole bypass the layer filter, no layers with a regex.
    #[test]
    fn exclusions_and_layer_indexes() {
        let cfg = |json: &str| -> AdapterConfig { serde_json::from_str(json).unwrap() };
        let m = TargetMatcher::for_config(&cfg(
            r#"{"peft_type":"LORA","target_modules":["q_proj","v_proj"],"layers_to_transform":[0,2],"exclude_modules":["model.layers.2.self_attn.v_proj"]}"#,
        ))
        .unwrap();
        assert!(m.matches("model.layers.0.self_attn.q_proj"));
        assert!(!m.matches("model.layers.1.self_attn.q_proj"));
        assert!(m.matches("model.layers.2.self_attn.q_proj"));
        assert!(!m.matches("model.layers.2.self_attn.v_proj"));
        assert!(!m.matches("model.layers.12.self_attn.q_proj"));
        let m = TargetMatcher::for_config(&cfg(
            r#"{"peft_type":"LORA","target_modules":"all-linear","layers_to_transform":1,"layers_pattern":"h","exclude_modules":".*mlp.*"}"#,
        ))
        .unwrap();
        assert!(m.matches("transformer.h.1.attn.c_attn"));
        assert!(!m.matches("transformer.h.1.mlp.c_fc"));
        assert!(!m.matches("transformer.h.0.attn.c_attn"));
        let regex_with_layers =
            cfg(r#"{"peft_type":"LORA","target_modules":".*q_proj","layers_to_transform":[0]}"#);
        assert!(TargetMatcher::for_config(&regex_with_layers).is_err());
        let pattern_alone = cfg(r#"{"peft_type":"LORA","layers_pattern":"layers"}"#);
        assert!(TargetMatcher::for_config(&pattern_alone).is_err());
    }

    #[test]
    fn unknown_target_lists_available_modules() {
        let m = TargetMatcher::new(&TargetModules::List(vec!["query".into()])).unwrap();
        let e = m
            .check_all_used(&[
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.mlp.up_proj",
            ])
            .unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("`query`") && e.contains("q_proj, up_proj"),
            "{e}"
        );
    }

    #[test]
    fn patterns_match_at_dot_boundaries() {
        let mut p = std::collections::BTreeMap::new();
        p.insert("layers.0.self_attn.q_proj".to_string(), 16usize);
        assert_eq!(
            pattern_lookup(&p, "model.layers.0.self_attn.q_proj"),
            Some(&16)
        );
        assert_eq!(pattern_lookup(&p, "model.layers.10.self_attn.q_proj"), None);
    }
}
