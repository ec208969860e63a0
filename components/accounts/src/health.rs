//! `GET /api/health`: is everything this deployment needs usable? Reports whether each secret
//! is set, never its value.

use spin_sdk::http::Method;
use vpp_spin_bridge::{gateway, vars, ApiResponse, SpinKv};
use vpp_store::Kv;

pub async fn check(kv: &SpinKv) -> ApiResponse {
    let probe_key = "health/probe";
    let kv_check = kv
        .set(probe_key, b"ok")
        .and_then(|_| kv.get(probe_key))
        .map(|v| v.as_deref() == Some(b"ok".as_slice()));
    let kv_ok = matches!(kv_check, Ok(true));
    let admin_key_set = vars::optional("admin_api_key").is_some();
    let apple = match gateway::call(Method::Get, "/health", None).await {
        Ok(r) if r.status == 200 => serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| serde_json::json!({"reachable": true, "ok": false})),
        Ok(r) => serde_json::json!({"reachable": true, "ok": false, "status": r.status}),
        Err(e) => serde_json::json!({"reachable": false, "ok": false, "error": e}),
    };
    let apple_ok = apple["ok"].as_bool() == Some(true);
    let ok = kv_ok && admin_key_set && apple_ok;
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "degraded" },
        "version": vpp_licensing::VERSION,
        "checks": {
            "keyValue": {"ok": kv_ok, "error": kv_check.err().map(|e| e.to_string())},
            "variables": {"ok": admin_key_set, "adminApiKey": admin_key_set, "publicUrl": vars::public_url()},
            "appleComponent": apple,
        }
    });
    ApiResponse::json(if ok { 200 } else { 503 }, &body)
}
