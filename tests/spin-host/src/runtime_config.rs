//! `spin up --runtime-config-file`: the parts this host acts on. Only key-value stores
//! (`[key_value_store.<label>]`) are read; other sections (sqlite, llm, variable providers, ...)
//! are accepted and ignored, as the host does not provide those interfaces.
//!
//! ```toml
//! [key_value_store.default]
//! type = "redis"
//! url = "redis://127.0.0.1:6379"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::key_value::StoreConfig;

#[derive(Debug, Default, Deserialize)]
struct RawRuntimeConfig {
    #[serde(default)]
    key_value_store: BTreeMap<String, RawStore>,
    #[serde(flatten)]
    _other: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    url: Option<String>,
    /// `type = "spin"`: the SQLite file; this host keeps stores in memory or in `--kv-dir`.
    #[serde(default)]
    path: Option<String>,
}

/// The key-value stores a runtime config defines, by label.
pub fn key_value_stores(text: &str) -> anyhow::Result<Vec<(String, StoreConfig)>> {
    let raw: RawRuntimeConfig = toml::from_str(text).context("parsing runtime config")?;
    let mut out = Vec::new();
    for (label, store) in raw.key_value_store {
        let config = match store.kind.as_str() {
            "spin" => {
                let _ = store.path;
                StoreConfig::Spin
            }
            "redis" => {
                let url = store.url.with_context(|| {
                    format!("key_value_store.{label}: type \"redis\" needs a url")
                })?;
                StoreConfig::Redis { url }
            }
            other => bail!(
                "key_value_store.{label}: type {other:?} is not supported by this host (spin, redis)"
            ),
        };
        out.push((label, config));
    }
    Ok(out)
}

pub fn load(path: &Path) -> anyhow::Result<Vec<(String, StoreConfig)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading runtime config {}", path.display()))?;
    key_value_stores(&text).with_context(|| format!("in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_and_spin_stores() {
        let stores = key_value_stores(
            r#"
[key_value_store.default]
type = "redis"
url = "redis://127.0.0.1:6379"

[key_value_store.cache]
type = "spin"
path = ".spin/cache.db"

[sqlite_database.default]
type = "spin"
"#,
        )
        .unwrap();
        assert_eq!(
            stores,
            vec![
                ("cache".to_string(), StoreConfig::Spin),
                (
                    "default".to_string(),
                    StoreConfig::Redis {
                        url: "redis://127.0.0.1:6379".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let no_url = key_value_stores("[key_value_store.default]\ntype = \"redis\"\n");
        assert!(format!("{:#}", no_url.unwrap_err()).contains("needs a url"));
        let cosmos = key_value_stores("[key_value_store.default]\ntype = \"azure_cosmos\"\n");
        assert!(format!("{:#}", cosmos.unwrap_err()).contains("not supported"));
    }
}
