//! Which linear layers an adapter wraps, with PEFT's matching rules.

use crate::config::TargetModules;
use factune_io::{Error, Result};
use regex::Regex;
use std::collections::BTreeSet;

/// PEFT: a listed name matches a module whose path equals it or ends with `.name`; a string is a regex that
/// must match the whole path; `all-linear` is every linear layer but the output head.
pub struct TargetMatcher {
    list: Option<Vec<String>>,
    regex: Option<Regex>,
    all: bool,
}

impl TargetMatcher {
    pub fn new(t: &TargetModules) -> Result<Self> {
        Ok(match t {
            TargetModules::Pattern(p) if p == "all-linear" => TargetMatcher {
                list: None,
                regex: None,
                all: true,
            },
            TargetModules::Pattern(p) => TargetMatcher {
                list: None,
                regex: Some(
                    Regex::new(&format!("^(?:{p})$"))
                        .map_err(|e| Error::config(format!("target_modules regex `{p}`: {e}")))?,
                ),
                all: false,
            },
            TargetModules::List(l) => TargetMatcher {
                list: Some(l.clone()),
                regex: None,
                all: false,
            },
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        if self.all {
            return true;
        }
        if let Some(re) = &self.regex {
            return re.is_match(path);
        }
        self.list.as_ref().is_some_and(|l| {
            l.iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}")))
        })
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
            return Err(Error::config(format!(
                "target_modules match no linear layer of this model; available: {avail} (or all-linear)"
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
