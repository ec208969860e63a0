//! The apple component: the only one that calls Apple and the only one given the key that
//! unseals server tokens. Reached by service chaining (private route) or, on platforms without
//! it, through a public route guarded by `internal_secret`. Its internal API is described in
//! docs/architecture.md; the other components use it through `vpp_spin_bridge::GatewayTransport`.

mod proxy;

use spin_sdk::http::{Request, Response};
use spin_sdk::http_component;
use vpp_licensing::auth::authorize_internal;
use vpp_licensing::{ApiError, ErrorCode};
use vpp_spin_bridge::gateway::INTERNAL_SECRET_HEADER;
use vpp_spin_bridge::{vars, ApiRequest, ApiResponse, SpinKv};

/// Where the internal API is mounted when reached through a public route instead of chaining.
const PUBLIC_PREFIX: &str = "/internal/apple";

#[http_component]
async fn handle(req: Request) -> Response {
    let mut api = ApiRequest::from_spin(&req);
    drop(req);
    let result = match authorize(&mut api) {
        Ok(()) => route(&api).await,
        Err(e) => Err(e),
    };
    result
        .unwrap_or_else(|e| ApiResponse::error(&e))
        .into_spin()
}

/// When `internal_secret` is set, every request must carry it, whatever its path (the other
/// components always send it); without one, only service chaining reaches the component (see
/// `vpp_licensing::auth::authorize_internal`).
fn authorize(api: &mut ApiRequest) -> Result<(), ApiError> {
    let secret = vars::optional("internal_secret");
    let presented = api.header(INTERNAL_SECRET_HEADER).map(str::to_string);
    api.path = authorize_internal(
        &api.path,
        PUBLIC_PREFIX,
        secret.as_deref(),
        presented.as_deref(),
    )?;
    Ok(())
}

async fn route(req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments = req.segments();
    if let ("GET", ["health"]) = (req.method.as_str(), segments.as_slice()) {
        return Ok(health());
    }
    let kv = SpinKv::open().map_err(ApiError::store)?;
    let ctx = proxy::Ctx::load(kv)?;
    match (req.method.as_str(), segments.as_slice()) {
        ("POST", ["tokens", "inspect"]) => ctx.inspect(req).await,
        ("GET", ["service-config"]) => ctx.service_config_response().await,
        ("GET", ["metadata"]) => ctx.metadata(req).await,
        ("DELETE", ["accounts", account]) => ctx.forget(account),
        ("GET", ["accounts", account, "lookup"]) => ctx.lookup(account, req).await,
        (_, ["accounts", account, "mdm", "v2", rest @ ..]) => {
            ctx.forward(account, &rest.join("/"), req).await
        }
        _ => Err(ApiError::no_route(&req.method, &req.path)),
    }
}

fn health() -> ApiResponse {
    let seal = vars::required("token_seal_key").and_then(|k| {
        vpp_seal::SealKey::from_base64(&k)
            .map_err(|e| ApiError::new(ErrorCode::Misconfigured, e.to_string()))
    });
    let origin = vars::required("apple_base_url");
    let ok = seal.is_ok() && origin.is_ok();
    ApiResponse::ok(&serde_json::json!({
        "reachable": true,
        "ok": ok,
        "sealKey": match &seal { Ok(_) => "valid".to_string(), Err(e) => e.message.clone() },
        "appleBaseUrl": origin.ok(),
    }))
}
