//! README's commands that need the Spin CLI or the network (`spin build --up`, `spin up -c ...`)
//! cannot run in CI; these tests check that `spin.toml` is what those commands need. The
//! commands that run on this machine are run by `scripts/check-first-run` and `scripts/test`.

use e2e::workspace_root;
use spin_host::manifest::Manifest;
use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).expect(path)
}

fn manifest() -> Manifest {
    Manifest::parse(&read("spin.toml"), &workspace_root()).expect("spin.toml is valid")
}

/// The components of every `spin up ... -c <id> ...` in TEXT, one set per command.
fn spin_up_selections(text: &str) -> Vec<BTreeSet<String>> {
    let mut selections = Vec::new();
    for (i, _) in text.match_indices("spin up") {
        let line = text[i..].lines().next().unwrap_or("");
        let words: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || c == '`' || c == ')' || c == '(')
            .filter(|w| !w.is_empty())
            .collect();
        let mut chosen = BTreeSet::new();
        let mut k = 2;
        while k < words.len() {
            if words[k] == "-c" || words[k] == "--component-id" {
                if let Some(id) = words.get(k + 1) {
                    chosen.insert(id.to_string());
                }
                k += 2;
            } else if words[k].starts_with('-') {
                k += 1;
            } else {
                break;
            }
        }
        if !chosen.is_empty() {
            selections.push(chosen);
        }
    }
    selections
}

/// The components that only the HTTP trigger runs: what "the HTTP components alone" means.
fn http_components(m: &Manifest) -> BTreeSet<String> {
    m.http_triggers
        .iter()
        .map(|t| t.component.clone())
        .collect()
}

/// `spin build && spin up -c ...` (README, without the cron plugin) and the demo's selection
/// name exactly the components the HTTP trigger runs: each exists, none runs on the cron
/// trigger (the plugin `spin up` would need), and every component one of them reaches by
/// service chaining (`http://<id>.spin.internal`) is selected too, or its calls would fail.
#[test]
fn spin_up_component_selections_are_the_http_components_alone() {
    let m = manifest();
    let http = http_components(&m);
    let cron: BTreeSet<String> = m
        .cron_triggers
        .iter()
        .map(|t| t.component.clone())
        .collect();
    assert!(
        !cron.is_empty(),
        "spin.toml has the cron trigger README talks about"
    );
    assert!(
        http.is_disjoint(&cron),
        "a component on the cron trigger must not also serve HTTP: {:?}",
        http.intersection(&cron).collect::<Vec<_>>()
    );
    let mut selections = Vec::new();
    for file in ["README.md", "scripts/demo"] {
        let text = read(file);
        let found = spin_up_selections(&text);
        // The demo writes its selection as an array: `components=(-c accounts ...)`.
        let found = if file == "scripts/demo" {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with("components=(-c"))
                .expect("scripts/demo selects the HTTP components without the cron plugin");
            let mut set = BTreeSet::new();
            let mut words = line.split(['(', ')', ' ']).filter(|w| !w.is_empty());
            while let Some(w) = words.next() {
                if w == "-c" {
                    set.insert(words.next().expect("an id after -c").to_string());
                }
            }
            vec![set]
        } else {
            found
        };
        assert!(!found.is_empty(), "{file} has a `spin up -c ...` command");
        selections.extend(found.into_iter().map(|s| (file, s)));
    }
    for (file, chosen) in selections {
        for id in &chosen {
            assert!(
                m.components.contains_key(id),
                "{file}: `-c {id}` names no component of spin.toml"
            );
        }
        assert_eq!(
            chosen, http,
            "{file}: `spin up -c ...` must select the HTTP components alone"
        );
        for id in &chosen {
            for host in &m.components[id].allowed_outbound_hosts {
                if let Some(target) = host
                    .strip_prefix("http://")
                    .and_then(|h| h.strip_suffix(".spin.internal"))
                {
                    assert!(
                        chosen.contains(target),
                        "{file}: {id} chains to {target}, which the selection leaves out"
                    );
                }
            }
        }
    }
}

/// `spin build --up`: each component's build command builds the package whose wasm is the
/// component's `source` (so `spin build` produces what `spin up` loads), and README's
/// `export SPIN_VARIABLE_...` lines set every variable spin.toml requires.
#[test]
fn spin_build_up_builds_each_source_and_readme_sets_every_required_variable() {
    let m = manifest();
    let doc: toml::Table = toml::from_str(&read("spin.toml")).expect("spin.toml");
    let workspace: toml::Table = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    let members: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|v| v.as_str().expect("member path").to_string())
        .collect();
    let packages: BTreeSet<String> = members
        .iter()
        .map(|dir| {
            let c: toml::Table =
                toml::from_str(&read(&format!("{dir}/Cargo.toml"))).expect("member Cargo.toml");
            c["package"]["name"].as_str().expect("name").to_string()
        })
        .collect();
    for (id, component) in doc["component"].as_table().expect("[component]") {
        let command = component["build"]["command"]
            .as_str()
            .unwrap_or_else(|| panic!("component {id} has a build command"));
        let words: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(
            &words[..5],
            ["cargo", "build", "--target", "wasm32-wasip1", "--release"],
            "component {id}: {command}"
        );
        assert_eq!(
            words.len(),
            7,
            "component {id} builds one package: {command}"
        );
        assert_eq!(words[5], "-p", "component {id}: {command}");
        let package = words[6];
        assert!(
            packages.contains(package),
            "component {id}: {package} is no workspace member"
        );
        let source = &m.components[id].source;
        assert_eq!(
            source,
            &workspace_root().join(format!(
                "target/wasm32-wasip1/release/{}.wasm",
                package.replace('-', "_")
            )),
            "component {id}: `spin build` must produce the source `spin up` loads"
        );
    }

    let readme = read("README.md");
    let exported: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export SPIN_VARIABLE_"))
        .filter_map(|l| l.split('=').next())
        .map(|name| name.to_ascii_lowercase())
        .collect();
    for (name, v) in &m.variables {
        if v.required {
            assert!(
                exported.contains(name),
                "README must export SPIN_VARIABLE_{} before `spin build --up`",
                name.to_ascii_uppercase()
            );
        }
    }
    assert!(
        readme.contains("\nspin build --up\n"),
        "README gives `spin build --up`"
    );
}

/// The cron component is separate and on the schedule README and the plugin expect: six fields
/// (seconds first), and the version of trigger-cron README installs is the one spin.toml names.
#[test]
fn the_cron_component_is_separate_and_on_the_documented_schedule() {
    let m = manifest();
    assert_eq!(m.cron_triggers.len(), 1, "one cron trigger");
    let cron = &m.cron_triggers[0];
    assert_eq!(cron.component, "scheduler");
    assert_eq!(cron.cron_expression.split_whitespace().count(), 6);
    let readme = read("README.md");
    assert!(readme.contains(&format!("`{}`", cron.cron_expression)));
    let spin_toml = read("spin.toml");
    let version = readme
        .split("trigger-cron --version ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("README installs trigger-cron at a pinned version");
    assert!(
        spin_toml.contains(&format!("trigger-cron {version}")),
        "spin.toml names trigger-cron {version}"
    );
}
