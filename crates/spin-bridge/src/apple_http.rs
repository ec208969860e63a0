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
        let url = match &req.target {
            Target::Api { .. } => req.url(&format!(
                "{}/accounts/{}/mdm/v2",
                gateway::base_url(),
                self.account
            )),
            // Apple's content lookup (names, icons): fetched by the apple component with the token.
            Target::Absolute(abs) => format!(
                "{}/accounts/{}/lookup?url={}",
                gateway::base_url(),
                self.account,
                vpp_apple::transport::percent_encode(abs)
            ),
        };
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

/// The account operations' way to Apple: the apple component's internal API.
pub struct SpinGateway;

impl vpp_licensing::account::Gateway for SpinGateway {
    type T = GatewayTransport;
    type C = SpinClock;

    async fn inspect(
        &self,
        account_id: &str,
        token: &str,
    ) -> Result<vpp_licensing::account::Inspected, vpp_licensing::ApiError> {
        use vpp_licensing::{ApiError, ErrorCode};
        let body =
            serde_json::to_vec(&serde_json::json!({"accountId": account_id, "token": token}))
                .map_err(ApiError::internal)?;
        let resp = gateway::call(Method::Post, "/tokens/inspect", Some(body))
            .await
            .map_err(|e| ApiError::new(ErrorCode::AppleUnavailable, e))?;
        let value: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if resp.status == 200 {
            let client_config =
                serde_json::from_value(value["clientConfig"].clone()).map_err(|e| {
                    ApiError::new(ErrorCode::AppleUnavailable, format!("client config: {e}"))
                })?;
            return Ok(vpp_licensing::account::Inspected {
                sealed: value["sealed"].as_str().unwrap_or_default().to_string(),
                client_config,
                owner: serde_json::from_value(value["owner"].clone()).unwrap_or_default(),
            });
        }
        // Our own error shape from the apple component, or Apple's answer passed through.
        if let Some(code) = value["error"]["code"].as_str() {
            let message = value["error"]["message"]
                .as_str()
                .unwrap_or(code)
                .to_string();
            let code = match code {
                "token_malformed" => ErrorCode::TokenMalformed,
                "misconfigured" => ErrorCode::Misconfigured,
                _ => ErrorCode::AppleUnavailable,
            };
            return Err(ApiError::new(code, message));
        }
        let apple = AppleResponse {
            status: resp.status,
            retry_after: resp.retry_after,
            body: resp.body,
        };
        match vpp_apple::AppleError::from_response(&apple, Utc::now()) {
            Some(e) => Err(e.into()),
            None => Err(ApiError::new(
                ErrorCode::AppleUnavailable,
                format!("unexpected answer {}", apple.status),
            )),
        }
    }

    fn client(&self, account_id: &str) -> vpp_apple::Client<GatewayTransport, SpinClock> {
        vpp_apple::Client::proxied(
            GatewayTransport {
                account: account_id.to_string(),
            },
            SpinClock,
        )
    }

    async fn forget(&self, account_id: &str) -> Result<(), vpp_licensing::ApiError> {
        let resp = gateway::call(Method::Delete, &format!("/accounts/{account_id}"), None)
            .await
            .map_err(|e| {
                vpp_licensing::ApiError::new(vpp_licensing::ErrorCode::AppleUnavailable, e)
            })?;
        if resp.status >= 300 {
            return Err(vpp_licensing::ApiError::internal(format!(
                "apple component refused to forget account: {}",
                resp.status
            )));
        }
        Ok(())
    }
}
