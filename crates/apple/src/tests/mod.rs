mod decode;
mod errors;
mod metadata;
mod paging;
mod retry;
mod split;
mod token;

use crate::client::Client;
use crate::testing::{FakeClock, ScriptedTransport};
use crate::types::{Limits, ServiceConfig};

/// A client with a fresh, injected service config (so no `service/config` call is made).
pub(crate) fn client_with(
    transport: ScriptedTransport,
    clock: FakeClock,
    limits: Limits,
) -> Client<ScriptedTransport, FakeClock> {
    let c = Client::new(transport, clock);
    c.set_service_config(ServiceConfig {
        limits,
        ..Default::default()
    });
    c
}

pub(crate) fn query_value(req: &crate::AppleRequest, key: &str) -> Option<String> {
    match &req.target {
        crate::Target::Api { query, .. } => {
            query.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
        }
        crate::Target::Absolute(_) => None,
    }
}

pub(crate) fn path(req: &crate::AppleRequest) -> String {
    match &req.target {
        crate::Target::Api { path, .. } => path.clone(),
        crate::Target::Absolute(u) => u.clone(),
    }
}
