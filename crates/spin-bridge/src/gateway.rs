//! Calls to the apple component's internal API, by service chaining (the default) or, where the
//! platform has none, by a self-request carrying the internal secret.

use crate::vars;
use spin_sdk::http::{Method, Request, Response};

/// Header that carries `internal_secret` when the gateway is reached through a public route.
pub const INTERNAL_SECRET_HEADER: &str = "x-vpp-internal";

pub struct GatewayResponse {
    pub status: u16,
    pub retry_after: Option<String>,
    pub owner: Option<String>,
    pub body: Vec<u8>,
}

pub fn base_url() -> String {
    vars::optional("apple_gateway_url")
        .unwrap_or_else(|| "http://apple.spin.internal".to_string())
        .trim_end_matches('/')
        .to_string()
}

/// Send `method path` (path starts with `/`) with an optional JSON body to the apple component.
pub async fn call(
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<GatewayResponse, String> {
    let url = format!("{}{}", base_url(), path);
    let mut b = Request::builder();
    b.method(method).uri(url);
    if let Some(secret) = vars::optional("internal_secret") {
        b.header(INTERNAL_SECRET_HEADER, secret);
    }
    if body.is_some() {
        b.header("content-type", "application/json");
    }
    let req = b.body(body.unwrap_or_default()).build();
    let resp: Response = spin_sdk::http::send(req)
        .await
        .map_err(|e| format!("apple component unreachable: {e}"))?;
    let header = |name: &str| {
        resp.header(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    Ok(GatewayResponse {
        status: *resp.status(),
        retry_after: header("retry-after"),
        owner: header("x-vpp-owner"),
        body: resp.body().to_vec(),
    })
}
