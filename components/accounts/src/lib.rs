//! The accounts component: App Store License accounts, jobs, the audit log, health, and the
//! JSON 404 for unknown `/api` routes. The route table is here; the work is in the domain.

use spin_sdk::http::{Method, Request, Response};
use spin_sdk::http_component;
use vpp_licensing::{audit, ApiError};
use vpp_spin_bridge::{gateway, http_api, vars, ApiRequest, ApiResponse, SpinKv};
use vpp_store::Kv;

#[http_component]
async fn handle(req: Request) -> Response {
    http_api::serve(req, is_public, route).await
}

fn is_public(req: &ApiRequest) -> bool {
    req.method == "GET" && req.path == "/api/health"
}

async fn route(kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments = req.segments();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["api", "health"]) => Ok(health(kv).await),
        ("GET", ["api", "audit"]) => {
            req.caller()?.require_admin("read the audit log")?;
            Ok(ApiResponse::ok(&audit::list(kv, req.query_u64("page")?)?))
        }
        (_, ["api", "health"]) => Err(ApiError::method_not_allowed(
            &req.method,
            &req.path,
            &["GET"],
        )),
        (_, ["api", "audit"]) => Err(ApiError::method_not_allowed(
            &req.method,
            &req.path,
            &["GET"],
        )),
        _ => Err(ApiError::no_route(&req.method, &req.path)),
    }
}

/// Is everything this deployment needs usable? Never reveals a secret, only whether it is set.
async fn health(kv: &SpinKv) -> ApiResponse {
    let probe_key = "health/probe";
    let kv_check = kv
        .set(probe_key, b"ok")
        .and_then(|_| kv.get(probe_key))
        .map(|v| v.as_deref() == Some(b"ok".as_slice()));
    let kv_ok = matches!(kv_check, Ok(true));
    let admin_key_set = vars::optional("admin_api_key").is_some();
    let apple = match gateway::call(Method::Get, "/health", None).await {
        Ok(r) if r.status == 200 => serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| serde_json::json!({"reachable": true})),
        Ok(r) => serde_json::json!({"reachable": true, "status": r.status}),
        Err(e) => serde_json::json!({"reachable": false, "error": e}),
    };
    let apple_ok =
        apple["reachable"].as_bool().unwrap_or(true) && apple["ok"].as_bool() == Some(true);
    let ok = kv_ok && admin_key_set && apple_ok;
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "degraded" },
        "version": vpp_licensing::VERSION,
        "checks": {
            "keyValue": {"ok": kv_ok, "error": kv_check.err().map(|e| e.to_string())},
            "variables": {"ok": admin_key_set, "admin_api_key": admin_key_set},
            "apple": apple,
        }
    });
    ApiResponse::json(if ok { 200 } else { 503 }, &body)
}
