//! The scheduler: a trigger-cron 0.4.x component (world `fermyon:spin-cron/spin-cron@2.0.0`).
//!
//! A cron component runs in the cron plugin's own process and cannot use service chaining, so it
//! does no work itself: each tick calls the authenticated daily route at `public_url`, exactly
//! as any external scheduler (Kubernetes CronJob, `spin aka crons`, ...) does.

use spin_sdk::http::{Method, Request, Response};

spin_sdk::wit_bindgen::generate!({
    world: "spin-cron",
    path: "wit/cron.wit",
    runtime_path: "::spin_sdk::wit_bindgen::rt",
});

struct Scheduler;

impl Guest for Scheduler {
    fn handle_cron_event(metadata: Metadata) -> Result<(), Error> {
        spin_sdk::http::run(tick(metadata.timestamp)).map_err(Error::Other)
    }
}

export!(Scheduler);

async fn tick(timestamp: u64) -> Result<(), String> {
    let base = variable("public_url")?;
    let key = variable("scheduler_api_key")?;
    let url = format!("{}/api/daily", base.trim_end_matches('/'));
    let req = Request::builder()
        .method(Method::Post)
        .uri(&url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"trigger\":\"cron\",\"timestamp\":{timestamp}}}"
        ))
        .build();
    let resp: Response = spin_sdk::http::send(req)
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = *resp.status();
    // One short line per tick (status, job id, progress) so the operator can follow the daily
    // work in the cron plugin's log; never the job record.
    let line = vpp_licensing::daily::tick_line(status, resp.body());
    println!("scheduler: {line}");
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("daily route answered {line}"))
    }
}

fn variable(name: &str) -> Result<String, String> {
    spin_sdk::variables::get(name)
        .map_err(|e| format!("variable {name}: {e}"))
        .map(|v| v.trim().to_string())
        .and_then(|v| {
            if v.is_empty() {
                Err(format!("variable {name} is empty"))
            } else {
                Ok(v)
            }
        })
}
