//! `vpp_apple` transports over Spin's outbound HTTP, and a clock for Spin.
//!
//! - [`AppleTransport`]: straight to Apple with the bearer; used only by the apple component.
//! - [`GatewayTransport`]: to the apple component's proxy for one account; used by everyone else,
//!   who never sees a token.

use crate::gateway::{self, INTERNAL_SECRET_HEADER};
use crate::vars;
use chrono::{DateTime, Utc};
use spin_sdk::http::{Method, Request, Response};
use std::time::Duration;
use vpp_apple::{AppleRequest, AppleResponse, Clock, Target, Transport};

fn spin_method(m: vpp_apple::Method) -> Method {
    match m {
        vpp_apple::Method::Get => Method::Get,
        vpp_apple::Method::Post => Method::Post,
    }
}

async fn send(req: Request) -> Result<AppleResponse, String> {
    let resp: Response = spin_sdk::http::send(req).await.map_err(|e| e.to_string())?;
    Ok(AppleResponse {
        status: *resp.status(),
        retry_after: resp
            .header("retry-after")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        body: resp.body().to_vec(),
    })
}

/// Apple itself, `{origin}/mdm/v2/...`, with `Authorization: Bearer <token file>`.
pub struct AppleTransport {
    pub origin: String,
    pub bearer: String,
}

impl Transport for AppleTransport {
    async fn send(&self, req: &AppleRequest) -> Result<AppleResponse, String> {
        let url = match &req.target {
            Target::Api { .. } => req.url(&format!("{}/mdm/v2", self.origin)),
            Target::Absolute(url) => url.clone(),
        };
        let mut b = Request::builder();
        b.method(spin_method(req.method)).uri(url);
        match &req.target {
            // Service config is the one endpoint without authentication.
            Target::Api { .. } if self.bearer.is_empty() => {}
            Target::Api { .. } => {
                b.header("authorization", format!("Bearer {}", self.bearer));
            }
            // The content lookup authenticates with the token as a cookie (custom apps).
            Target::Absolute(_) if self.bearer.is_empty() => {}
            Target::Absolute(_) => {
                b.header("cookie", format!("itvt={}", self.bearer));
            }
        }
        if req.body.is_some() {
            b.header("content-type", "application/json");
        }
        send(b.body(req.body.clone().unwrap_or_default()).build()).await
    }
}

/// The apple component's proxy for one account: Apple's protocol, without the token.
pub struct GatewayTransport {
    pub account: String,
}

impl Transport for GatewayTransport {
    async fn send(&self, req: &AppleRequest) -> Result<AppleResponse, String> {
        let Target::Api { .. } = &req.target else {
            return Err("absolute URLs are not proxied; use the gateway's /metadata".into());
        };
        let url = req.url(&format!(
            "{}/accounts/{}/mdm/v2",
            gateway::base_url(),
            self.account
        ));
        let mut b = Request::builder();
        b.method(spin_method(req.method)).uri(url);
        if let Some(secret) = vars::optional("internal_secret") {
            b.header(INTERNAL_SECRET_HEADER, secret);
        }
        if req.body.is_some() {
            b.header("content-type", "application/json");
        }
        send(b.body(req.body.clone().unwrap_or_default()).build()).await
    }
}

/// Wall-clock time; sleeping blocks the instance (it serves one request anyway).
pub struct SpinClock;

impl Clock for SpinClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn jitter(&self) -> f64 {
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_err() {
            return 0.5;
        }
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Random identifiers (accounts, jobs, secrets): 128 bits, hex.
pub fn random_id() -> Result<String, String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| e.to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
