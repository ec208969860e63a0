//! `spin.toml` (manifest version 2): the parts this host runs, validated as Spin validates them.
//!
//! Unknown fields are rejected where Spin's manifest schema rejects them, so a manifest that
//! loads here also loads in Spin. Fields Spin accepts but this host does not act on (build,
//! files, sqlite, ...) are accepted and ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::variables::{self, AppVariable, Template};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    spin_manifest_version: toml::Value,
    application: RawApplication,
    #[serde(default)]
    variables: BTreeMap<String, RawVariable>,
    #[serde(default)]
    trigger: RawTriggers,
    #[serde(default)]
    component: BTreeMap<String, RawComponent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApplication {
    name: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    authors: Vec<String>,
    #[serde(default)]
    targets: Option<toml::Value>,
    #[serde(default)]
    trigger: Option<toml::Value>,
    #[serde(default)]
    tool: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariable {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    secret: bool,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTriggers {
    #[serde(default)]
    http: Vec<RawHttpTrigger>,
    #[serde(default)]
    cron: Vec<RawCronTrigger>,
    /// Other trigger types (redis, ...) are not run by this host.
    #[serde(flatten)]
    _other: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRoute {
    Path(String),
    Private(RawPrivate),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivate {
    private: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpTrigger {
    #[serde(default)]
    id: Option<String>,
    route: RawRoute,
    component: Option<String>,
    #[serde(default)]
    executor: Option<toml::Value>,
    #[serde(default)]
    static_response: Option<toml::Value>,
}

/// trigger-cron's `CronTriggerConfig` has `deny_unknown_fields`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCronTrigger {
    #[serde(default)]
    id: Option<String>,
    component: String,
    cron_expression: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    source: toml::Value,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    key_value_stores: Vec<String>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    files: Option<toml::Value>,
    #[serde(default)]
    exclude_files: Option<toml::Value>,
    #[serde(default)]
    sqlite_databases: Option<toml::Value>,
    #[serde(default)]
    ai_models: Option<toml::Value>,
    #[serde(default)]
    targets: Option<toml::Value>,
    #[serde(default)]
    build: Option<toml::Value>,
    #[serde(default)]
    tool: Option<toml::Value>,
    #[serde(default)]
    dependencies_inherit_configuration: Option<toml::Value>,
    #[serde(default)]
    dependencies: Option<toml::Value>,
}

/// A component as the host runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentConfig {
    pub id: String,
    /// Absolute path of the `.wasm` (relative sources are resolved against the manifest dir).
    pub source: PathBuf,
    pub allowed_outbound_hosts: Vec<String>,
    pub key_value_stores: Vec<String>,
    pub environment: BTreeMap<String, String>,
    /// Component variable name → template over application variables.
    pub variables: BTreeMap<String, Template>,
}

/// An `[[trigger.http]]` entry: `route` is `None` for `{ private = true }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpTrigger {
    pub component: String,
    pub route: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronTrigger {
    pub component: String,
    pub cron_expression: String,
}

/// A validated manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    pub dir: PathBuf,
    pub variables: BTreeMap<String, AppVariable>,
    pub http_triggers: Vec<HttpTrigger>,
    pub cron_triggers: Vec<CronTrigger>,
    pub components: BTreeMap<String, ComponentConfig>,
}

/// Spin requires kebab-case ids: lowercase letters and digits in `-`-separated words.
fn validate_id(kind: &str, id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id.split('-').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if !ok {
        bail!("{kind} {id:?} is not valid: ids must be kebab-case (lowercase letters, digits and single hyphens, starting with a letter)");
    }
    Ok(())
}

impl Manifest {
    /// Read and validate a manifest file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading manifest {}", path.display()))?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        Self::parse(&text, &dir).with_context(|| format!("invalid manifest {}", path.display()))
    }

    /// Parse and validate manifest text; `dir` is where relative sources are resolved.
    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let raw: RawManifest = toml::from_str(text)?;
        match raw.spin_manifest_version {
            toml::Value::Integer(2) => {}
            toml::Value::String(ref s) if s == "2" => {}
            other => bail!("unsupported spin_manifest_version {other}: this host runs version 2"),
        }
        let app = raw.application;
        if app.name.trim().is_empty() {
            bail!("application.name must not be empty");
        }
        let _ = (&app.authors, &app.targets, &app.trigger, &app.tool);

        let mut variables = BTreeMap::new();
        for (name, v) in raw.variables {
            variables::validate_name(&name).map_err(anyhow::Error::msg)?;
            if v.required && v.default.is_some() {
                bail!("variable {name:?}: a required variable must not have a default");
            }
            if !v.required && v.default.is_none() {
                bail!("variable {name:?}: must have a default or be required = true");
            }
            let _ = &v.description;
            variables.insert(
                name,
                AppVariable {
                    default: v.default,
                    required: v.required,
                    secret: v.secret,
                },
            );
        }

        let mut components = BTreeMap::new();
        for (id, c) in raw.component {
            validate_id("component id", &id)?;
            let source = match &c.source {
                toml::Value::String(s) => dir.join(s),
                other => bail!(
                    "component {id:?}: only a local file `source` is supported by this host, got {other}"
                ),
            };
            let mut vars = BTreeMap::new();
            for (key, value) in &c.variables {
                variables::validate_name(key)
                    .map_err(|e| anyhow::anyhow!("component {id:?}: {e}"))?;
                let template = Template::parse(value)
                    .with_context(|| format!("component {id:?} variable {key:?}"))?;
                for var in template.variables() {
                    if !variables.contains_key(var) {
                        bail!("component {id:?} variable {key:?}: invalid variable template: unknown variable {var:?}");
                    }
                }
                vars.insert(key.clone(), template);
            }
            for host in &c.allowed_outbound_hosts {
                let t = Template::parse(host)
                    .with_context(|| format!("component {id:?} allowed_outbound_hosts"))?;
                for var in t.variables() {
                    if !variables.contains_key(var) {
                        bail!("component {id:?}: allowed_outbound_hosts entry {host:?} uses unknown variable {var:?}");
                    }
                }
            }
            let _ = (
                &c.description,
                &c.files,
                &c.exclude_files,
                &c.sqlite_databases,
                &c.ai_models,
                &c.targets,
                &c.build,
                &c.tool,
                &c.dependencies_inherit_configuration,
                &c.dependencies,
            );
            components.insert(
                id.clone(),
                ComponentConfig {
                    id,
                    source,
                    allowed_outbound_hosts: c.allowed_outbound_hosts,
                    key_value_stores: c.key_value_stores,
                    environment: c.environment,
                    variables: vars,
                },
            );
        }

        let mut http_triggers = Vec::new();
        for t in raw.trigger.http {
            let _ = (&t.id, &t.executor);
            if t.static_response.is_some() {
                bail!("static_response triggers are not supported by this host");
            }
            let component = t.component.context(
                "[[trigger.http]] needs a `component` (inline components are not supported)",
            )?;
            if !components.contains_key(&component) {
                bail!("[[trigger.http]] references unknown component {component:?}");
            }
            let route = match t.route {
                RawRoute::Path(p) => Some(p),
                RawRoute::Private(RawPrivate { private: true }) => None,
                RawRoute::Private(RawPrivate { private: false }) => bail!(
                    "route must be a string pattern or '{{ private = true }}': '{component}' has {{ private = false }}"
                ),
            };
            http_triggers.push(HttpTrigger { component, route });
        }

        let mut cron_triggers = Vec::new();
        for t in raw.trigger.cron {
            let _ = &t.id;
            if !components.contains_key(&t.component) {
                bail!(
                    "[[trigger.cron]] references unknown component {:?}",
                    t.component
                );
            }
            crate::cron::Schedule::parse(&t.cron_expression).with_context(|| {
                format!(
                    "[[trigger.cron]] for {:?}: bad cron_expression",
                    t.component
                )
            })?;
            cron_triggers.push(CronTrigger {
                component: t.component,
                cron_expression: t.cron_expression,
            });
        }

        Ok(Self {
            name: app.name,
            version: app.version,
            description: app.description,
            dir: dir.to_path_buf(),
            variables,
            http_triggers,
            cron_triggers,
            components,
        })
    }

    /// Spin fails the load when a component asks for a store label no runtime config defines;
    /// only `default` exists without one.
    pub fn check_kv_labels(&self, extra_labels: &[String]) -> anyhow::Result<()> {
        for c in self.components.values() {
            for label in &c.key_value_stores {
                if label != "default" && !extra_labels.contains(label) {
                    bail!(
                        "unknown key_value_stores label {label:?} for component {:?}",
                        c.id
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
spin_manifest_version = 2

[application]
name = "demo"
version = "0.1.0"

[variables]
api_base = { default = "http://127.0.0.1:9000" }
secret_key = { required = true, secret = true }

[[trigger.http]]
route = "/api/..."
component = "api"

[[trigger.http]]
route = { private = true }
component = "internal"

[[trigger.cron]]
component = "tick"
cron_expression = "0 0 3 * * *"

[component.api]
source = "target/api.wasm"
allowed_outbound_hosts = ["http://internal.spin.internal", "{{ api_base }}"]
key_value_stores = ["default"]
environment = { RUST_LOG = "info" }
[component.api.variables]
base = "{{ api_base }}/v1"
literal = "x"
[component.api.build]
command = "cargo build"

[component.internal]
source = "internal.wasm"

[component.tick]
source = "tick.wasm"
"#;

    fn parse(text: &str) -> anyhow::Result<Manifest> {
        Manifest::parse(text, Path::new("/app"))
    }

    #[test]
    fn parses_a_full_manifest() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.name, "demo");
        assert_eq!(m.components.len(), 3);
        let api = &m.components["api"];
        assert_eq!(api.source, Path::new("/app/target/api.wasm"));
        assert_eq!(api.key_value_stores, ["default"]);
        assert_eq!(api.environment["RUST_LOG"], "info");
        assert_eq!(api.variables.len(), 2);
        assert_eq!(
            m.http_triggers,
            vec![
                HttpTrigger {
                    component: "api".into(),
                    route: Some("/api/...".into())
                },
                HttpTrigger {
                    component: "internal".into(),
                    route: None
                },
            ]
        );
        assert_eq!(m.cron_triggers[0].cron_expression, "0 0 3 * * *");
        assert!(m.variables["secret_key"].required);
        m.check_kv_labels(&[]).unwrap();
    }

    fn expect_err(text: &str, needle: &str) {
        let err = format!("{:#}", parse(text).unwrap_err());
        assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    }

    #[test]
    fn rejects_what_spin_rejects() {
        expect_err(
            &GOOD.replace("spin_manifest_version = 2", "spin_manifest_version = 1"),
            "spin_manifest_version",
        );
        expect_err(
            &GOOD.replace("api_base = {", "Api_Base = {"),
            "invalid variable name",
        );
        expect_err(
            &GOOD.replace("base = \"{{ api_base }}/v1\"", "bad__name = \"x\""),
            "invalid variable name",
        );
        expect_err(
            &GOOD.replace("\"{{ api_base }}/v1\"", "\"{{ nope }}\""),
            "unknown variable",
        );
        expect_err(
            &GOOD.replace("route = { private = true }", "route = { private = false }"),
            "private = false",
        );
        expect_err(
            &GOOD.replace("component = \"tick\"", "component = \"nope\""),
            "unknown component",
        );
        expect_err(&GOOD.replace("0 0 3 * * *", "0 3 * * *"), "cron_expression");
        expect_err(
            &GOOD.replace("[component.tick]", "[component.Tick_1]"),
            "kebab-case",
        );
        expect_err(
            &GOOD.replace("key_value_stores =", "key_value_store ="),
            "unknown field",
        );
        expect_err(
            &GOOD.replace(
                "secret_key = { required = true, secret = true }",
                "secret_key = { secret = true }",
            ),
            "default or be required",
        );
        expect_err(&GOOD.replace("name = \"demo\"", ""), "name");
    }

    #[test]
    fn kv_labels_other_than_default_need_host_options() {
        let m = parse(&GOOD.replace(
            "key_value_stores = [\"default\"]",
            "key_value_stores = [\"default\", \"cache\"]",
        ))
        .unwrap();
        let err = m.check_kv_labels(&[]).unwrap_err().to_string();
        assert!(
            err.contains("unknown key_value_stores label \"cache\" for component \"api\""),
            "{err}"
        );
        m.check_kv_labels(&["cache".to_string()]).unwrap();
    }
}
