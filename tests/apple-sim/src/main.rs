//! `apple-sim --listen 127.0.0.1:8787 [--demo] [--page-size N] [--event-delay-ms N] [--no-rate-limit]`

use std::net::SocketAddr;
use std::time::Duration;

use apple_sim::Simulator;

const USAGE: &str =
    "usage: apple-sim [--listen ADDR] [--demo] [--page-size N] [--event-delay-ms N] \
[--duplicate-notifications] [--no-rate-limit]

Simulates Apple's Apps and Books v2 API at http://ADDR/mdm/v2 with a control API at /control
(see tests/apple-sim/README.md). Default ADDR: 127.0.0.1:8787.";

fn main() -> anyhow::Result<()> {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8787));
    let mut demo = false;
    let mut page_size = None;
    let mut delay = None;
    let mut dup = false;
    let mut no_rate = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--listen" => listen = value("--listen")?.parse()?,
            "--demo" => demo = true,
            "--page-size" => page_size = Some(value("--page-size")?.parse::<usize>()?),
            "--event-delay-ms" => delay = Some(value("--event-delay-ms")?.parse::<u64>()?),
            "--duplicate-notifications" => dup = true,
            "--no-rate-limit" => no_rate = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let sim = Simulator::start_on(listen)?;
    if let Some(n) = page_size {
        sim.set_page_size(n);
    }
    if let Some(ms) = delay {
        sim.set_event_delay(Duration::from_millis(ms));
    }
    sim.set_duplicate_notifications(dup);
    if no_rate {
        sim.set_rate_limit_enabled(false);
    }
    println!("apple-sim listening on {}", sim.origin());
    println!("  Apple API:   {}/mdm/v2", sim.origin());
    println!("  control API: {}/control", sim.origin());
    if demo {
        for (name, token) in sim.seed_demo() {
            println!();
            println!("demo location {name:?}, token (the .vpptoken file content):");
            println!("{token}");
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
