//! Turning a component's `.wasm` into something wasmtime can instantiate, as Spin does at load:
//! a wasip1 core module is componentized with the preview1 *reactor* adapter (what Spin's
//! `crates/componentize` does for wit-bindgen >= 0.5 modules such as spin-sdk 5.2's); a file that
//! already is a component is used as is. Compiled artifacts are cached on disk so repeated test
//! processes only deserialize (about 1 ms) instead of compiling (seconds in a debug build).

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// Bumped when anything that changes the compiled output (engine config, adapter) changes.
const CACHE_FORMAT: &str = "spin-host-v1";
const WASMTIME_VERSION: &str = "48.0.8";

/// The engine every component of an app is compiled for. With `epoch_interruption` the code
/// checks an epoch counter so a guest that computes without end can be stopped (an invocation
/// time limit); it changes the compiled code, so it is part of the cache key.
pub fn engine(epoch_interruption: bool) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(epoch_interruption);
    // Kept at defaults otherwise: the cache key below assumes this exact configuration.
    Engine::new(&config).map_err(anyhow::Error::from)
}

/// How often the epoch advances when epoch interruption is on.
pub const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Advance `engine`'s epoch every [`EPOCH_TICK`] until the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::spawn(move || loop {
        std::thread::sleep(EPOCH_TICK);
        match weak.upgrade() {
            Some(engine) => engine.increment_epoch(),
            None => return,
        }
    });
}

/// `true` for a component binary, `false` for a core module.
fn is_component(bytes: &[u8]) -> bool {
    // Header: `\0asm`, a 16-bit version, then a 16-bit layer: 0 = core module, 1 = component.
    bytes.len() >= 8 && bytes.starts_with(b"\0asm") && bytes[6..8] == [1, 0]
}

/// Wrap a wasip1 core module into a component with the preview1 reactor adapter.
pub fn componentize(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .context("reading the core module's component type information")?
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .context("adding the wasi_snapshot_preview1 reactor adapter")?
        .encode()
        .context("componentizing the module")
}

/// Where compiled components are cached: `$CARGO_TARGET_DIR/spin-host-cache`, else
/// `<manifest dir>/target/spin-host-cache`.
pub fn default_cache_dir(manifest_dir: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("spin-host-cache"),
        _ => manifest_dir.join("target").join("spin-host-cache"),
    }
}

fn cache_key(engine: &Engine, bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT.as_bytes());
    // Engines differing in configuration (epoch interruption) compile differently.
    let mut config_hash = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut config_hash);
    h.update(std::hash::Hasher::finish(&config_hash).to_le_bytes());
    h.update(WASMTIME_VERSION.as_bytes());
    h.update(std::env::consts::ARCH.as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Load a `.wasm` as a compiled component, from the cache when possible.
pub fn load_component(
    engine: &Engine,
    source: &Path,
    cache_dir: Option<&Path>,
) -> anyhow::Result<Component> {
    let bytes =
        std::fs::read(source).with_context(|| format!("reading component {}", source.display()))?;
    let cached = cache_dir.map(|d| d.join(format!("{}.cwasm", cache_key(engine, &bytes))));
    if let Some(path) = &cached {
        if path.exists() {
            // SAFETY: the file was written by `Engine::precompile_component` of this same
            // wasmtime version and config (both are in the cache key), and is only ever
            // replaced atomically by rename, so it is a complete artifact we produced.
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(c) => return Ok(c),
                Err(e) => eprintln!(
                    "spin-host: ignoring unusable cache entry {}: {e}",
                    path.display()
                ),
            }
        }
    }
    let component_bytes = if is_component(&bytes) {
        bytes
    } else {
        componentize(&bytes).with_context(|| format!("componentizing {}", source.display()))?
    };
    let serialized = engine
        .precompile_component(&component_bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", source.display()))?;
    if let Some(path) = &cached {
        // A failed cache write only costs time later; never fail the load for it.
        if let Err(e) = write_atomically(path, &serialized) {
            eprintln!("spin-host: could not cache {}: {e:#}", path.display());
        }
    }
    // SAFETY: `serialized` was just produced by `precompile_component` on this engine.
    unsafe { Component::deserialize(engine, &serialized) }.map_err(anyhow::Error::from)
}

/// Write via a unique temp file + rename, so concurrent test processes never see a partial file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
