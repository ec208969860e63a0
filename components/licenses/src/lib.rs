//! The licenses component: counts, assignments, policies, reconcile, settings, notices, Apple's
//! notifications and the daily work. The route table is here; the work is in the domain.

use spin_sdk::http::{Request, Response};
use spin_sdk::http_component;
use vpp_licensing::ApiError;
use vpp_spin_bridge::{http_api, ApiRequest, ApiResponse, SpinKv};

#[http_component]
async fn handle(req: Request) -> Response {
    http_api::serve(req, is_public, route).await
}

/// Apple's notifications carry the account's notification secret instead of an API key.
fn is_public(req: &ApiRequest) -> bool {
    req.path.starts_with("/api/apple/notifications/")
}

async fn route(_kv: &SpinKv, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments = req.segments();
    match (req.method.as_str(), segments.as_slice()) {
        _ => Err(ApiError::no_route(&req.method, &req.path)),
    }
}
