//! `spin-host serve --listen 127.0.0.1:3000 [--manifest spin.toml] [--variable k=v]...
//! [--kv-dir .spin/kv] [--runtime-config-file rc.toml] [--platform managed-cloud]` serves the app (and runs its cron triggers on their UTC schedule) until
//! killed; `spin-host cron <component-id> [same options]` invokes a cron component once.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use spin_host::{App, HostOptions};

const USAGE: &str = "usage:
  spin-host serve [--listen 127.0.0.1:3000] [--manifest spin.toml] [--variable k=v]... [--kv-dir DIR] [--kv-label LABEL]... [--runtime-config-file FILE] [--platform self-hosted|managed-cloud] [--no-cron]
  spin-host cron <component-id> [--manifest spin.toml] [--variable k=v]... [--kv-dir DIR] [--kv-label LABEL]... [--runtime-config-file FILE]";

struct Args {
    command: String,
    component: Option<String>,
    listen: SocketAddr,
    manifest: PathBuf,
    options: HostOptions,
    run_cron: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let command = it.next().context(USAGE)?;
    let mut args = Args {
        command,
        component: None,
        listen: "127.0.0.1:3000".parse()?,
        manifest: PathBuf::from("spin.toml"),
        options: HostOptions::default(),
        run_cron: true,
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v.parse().with_context(|| format!("bad --listen {v:?}"))?;
            }
            "--manifest" | "-f" => args.manifest = PathBuf::from(value("--manifest")?),
            "--variable" => {
                let v = value("--variable")?;
                let (k, val) = v
                    .split_once('=')
                    .with_context(|| format!("--variable {v:?} must be k=v"))?;
                args.options
                    .variables
                    .push((k.to_string(), val.to_string()));
            }
            "--kv-dir" => args.options.kv_dir = Some(PathBuf::from(value("--kv-dir")?)),
            "--kv-label" => args.options.kv_labels.push(value("--kv-label")?),
            "--runtime-config-file" => {
                args.options.runtime_config = Some(PathBuf::from(value("--runtime-config-file")?))
            }
            "--platform" => {
                args.options.platform = spin_host::Platform::parse(&value("--platform")?)?
            }
            "--no-cron" => args.run_cron = false,
            "-h" | "--help" => bail!("{USAGE}"),
            other if !other.starts_with('-') && args.component.is_none() => {
                args.component = Some(other.to_string())
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    match args.command.as_str() {
        "serve" => {
            let app = App::load(&args.manifest, args.options)?;
            let server = app.serve(args.listen).await?;
            println!("Serving http://{}", server.local_addr());
            for (component, route) in app.routes() {
                println!("  {component}: http://{}{route}", server.local_addr());
            }
            if args.run_cron {
                for (component, expr) in app.cron_triggers() {
                    println!("  cron {component}: {expr} (UTC)");
                    tokio::spawn(cron_loop(app.clone(), component, expr));
                }
            }
            server.wait().await;
            Ok(())
        }
        "cron" => {
            let component = args.component.context(USAGE)?;
            let app = App::load(&args.manifest, args.options)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            match app.run_cron(&component, now).await? {
                Ok(()) => Ok(()),
                Err(e) => bail!("cron component {component:?} returned an error: {e}"),
            }
        }
        _ => bail!("{USAGE}"),
    }
}

/// Fire a cron component on its schedule; like trigger-cron, failures are logged, not fatal.
async fn cron_loop(app: App, component: String, expression: String) {
    let schedule = match spin_host::cron::Schedule::parse(&expression) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("spin-host: cron {component}: {e:#}");
            return;
        }
    };
    loop {
        let now = chrono::Utc::now();
        let Some(next) = schedule.next_after(now) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        match app
            .run_cron(&component, next.timestamp().max(0) as u64)
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("spin-host: cron {component} returned error: {e}"),
            Err(e) => eprintln!("spin-host: cron {component} failed: {e:#}"),
        }
    }
}
