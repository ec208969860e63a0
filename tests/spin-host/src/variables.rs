//! Application variables as Spin resolves them (`crates/expressions`, `crates/factor-variables`).
//!
//! * Names: lowercase ASCII letters, digits and single underscores; start with a letter, end
//!   with a letter or digit.
//! * Templates: literal text with `{{ name }}` expressions naming *application* variables.
//! * Values, in priority order: explicit overrides (`spin up --variable k=v`), then the
//!   environment (`SPIN_VARIABLE_<UPPER_NAME>`), then the manifest default. A required variable
//!   with no value fails the load, as Spin's `prepare()` does at startup.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context};

/// Why a variable name is rejected, in Spin's words.
pub fn validate_name(key: &str) -> Result<(), String> {
    let reason = if key.is_empty() {
        "must not be empty".to_string()
    } else if let Some(invalid) = key
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        format!("invalid character {invalid:?}. Variable names may contain only lower-case letters, numbers, and underscores.")
    } else if !key.starts_with(|c: char| c.is_ascii_lowercase()) {
        "must start with a lowercase ASCII letter".to_string()
    } else if !key.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        "must end with a lowercase ASCII letter or digit".to_string()
    } else if key.contains("__") {
        "must not contain multiple consecutive underscores".to_string()
    } else {
        return Ok(());
    };
    Err(format!("invalid variable name: {key:?}: {reason}"))
}

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    Expr(String),
}

/// A `{{ var }}` template, parsed exactly as Spin's `Template::new` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(template: &str) -> anyhow::Result<Self> {
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            if let Some(expr_rest) = rest.strip_prefix("{{") {
                let Some((expr, after)) = expr_rest.split_once("}}") else {
                    bail!("invalid variable template: unmatched '{{{{' in template {template:?}");
                };
                parts.push(Part::Expr(expr.trim().to_string()));
                rest = after;
            } else if let Some(idx) = rest.find("{{") {
                parts.push(Part::Lit(rest[..idx].to_string()));
                rest = &rest[idx..];
            } else {
                parts.push(Part::Lit(rest.to_string()));
                rest = "";
            }
        }
        Ok(Self { parts })
    }

    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// The application variables this template refers to.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Expand with resolved application variable values.
    pub fn resolve(&self, values: &HashMap<String, String>) -> anyhow::Result<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(l) => out.push_str(l),
                Part::Expr(name) => out.push_str(
                    values
                        .get(name)
                        .with_context(|| format!("invalid variable name: {name}"))?,
                ),
            }
        }
        Ok(out)
    }
}

/// An `[variables]` entry of the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppVariable {
    pub default: Option<String>,
    pub required: bool,
    pub secret: bool,
}

/// Resolve every application variable to a value, or fail like Spin's startup does.
///
/// `overrides` wins over `env` (a lookup of `SPIN_VARIABLE_<UPPER>`), which wins over defaults.
pub fn resolve_app_variables(
    vars: &BTreeMap<String, AppVariable>,
    overrides: &[(String, String)],
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (name, var) in vars {
        let from_override = overrides
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone());
        let value = from_override
            .or_else(|| env(&env_key(name)))
            .or_else(|| var.default.clone());
        match value {
            Some(v) => {
                out.insert(name.clone(), v);
            }
            None => bail!("no provider resolved required variable {name:?}"),
        }
    }
    Ok(out)
}

/// The environment variable Spin's environment provider reads for an application variable.
pub fn env_key(name: &str) -> String {
    format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase())
}

/// Errors a guest can see from `fermyon:spin/variables.get`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetError {
    InvalidName(String),
    Undefined(String),
}

/// A component's view of variables: only the names in its `[component.x.variables]`,
/// already expanded from the application variables.
#[derive(Clone, Debug, Default)]
pub struct ComponentVariables {
    pub component_id: String,
    pub values: BTreeMap<String, String>,
}

impl ComponentVariables {
    pub fn get(&self, name: &str) -> Result<String, GetError> {
        validate_name(name).map_err(GetError::InvalidName)?;
        self.values.get(name).cloned().ok_or_else(|| {
            GetError::Undefined(format!(
                "undefined variable: no variable for {:?}.{name:?}",
                self.component_id
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_spin_rules() {
        for good in ["a", "abc", "a1b2c3", "a_1", "a_1_b_3", "apple_base_url"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "aX", "1bc", "_x", "x.y", "x_", "a__b", "x-y", "Upper"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_parse_and_expand() {
        let t = Template::parse("a-{{ x }}-b{{y}}").unwrap();
        assert!(!t.is_literal());
        assert_eq!(t.variables().collect::<Vec<_>>(), ["x", "y"]);
        let values = HashMap::from([("x".to_string(), "1".to_string()), ("y".into(), "2".into())]);
        assert_eq!(t.resolve(&values).unwrap(), "a-1-b2");
        assert!(Template::parse("plain").unwrap().is_literal());
        assert!(Template::parse("{{ open").is_err());
        assert!(Template::parse("{{ missing }}")
            .unwrap()
            .resolve(&values)
            .is_err());
    }

    #[test]
    fn values_come_from_overrides_then_env_then_default() {
        let vars = BTreeMap::from([
            (
                "a".to_string(),
                AppVariable {
                    default: Some("da".into()),
                    ..Default::default()
                },
            ),
            (
                "b".to_string(),
                AppVariable {
                    default: Some("db".into()),
                    ..Default::default()
                },
            ),
            (
                "c".to_string(),
                AppVariable {
                    default: Some("dc".into()),
                    ..Default::default()
                },
            ),
            (
                "r".to_string(),
                AppVariable {
                    required: true,
                    ..Default::default()
                },
            ),
        ]);
        let env = |k: &str| match k {
            "SPIN_VARIABLE_A" => Some("env-a".to_string()),
            "SPIN_VARIABLE_B" => Some("env-b".to_string()),
            "SPIN_VARIABLE_R" => Some("env-r".to_string()),
            _ => None,
        };
        let got = resolve_app_variables(&vars, &[("a".into(), "cli-a".into())], env).unwrap();
        assert_eq!(got["a"], "cli-a");
        assert_eq!(got["b"], "env-b");
        assert_eq!(got["c"], "dc");
        assert_eq!(got["r"], "env-r");

        let err = resolve_app_variables(&vars, &[], |_| None).unwrap_err();
        assert!(err.to_string().contains("\"r\""), "{err}");
    }

    #[test]
    fn component_sees_only_its_names() {
        let cv = ComponentVariables {
            component_id: "api".into(),
            values: BTreeMap::from([("base".to_string(), "x".to_string())]),
        };
        assert_eq!(cv.get("base").unwrap(), "x");
        assert!(matches!(cv.get("other"), Err(GetError::Undefined(_))));
        assert!(matches!(cv.get("Bad-Name"), Err(GetError::InvalidName(_))));
    }
}
