//! The OpenAPI 3.1 description of the whole API, served at `GET /api/openapi.json`: the exact
//! contract, checked by Schemathesis (`bash scripts/contract`).
//!
//! Account, job, audit, health and metrics routes are described here; licenses routes come from
//! [`crate::licenses_openapi`]. [`document`] then adds what every operation shares, so no route
//! can forget it: 401 (and the bearer scheme) on every protected route, 403 where the reader key
//! is not enough, 400/413 where a JSON body is read, 503 when the store or configuration
//! fails, 422/429/502 where Apple is called; each error response lists its exact codes.

use serde_json::{json, Map, Value};

/// The largest whole number a query parameter takes (the code reads them as u64).
pub const MAX_QUERY_INT: u64 = u64::MAX;

/// An error response naming the codes it may carry; [`document`] turns the codes into the
/// response's description and a schema whose `code` is one of them.
pub fn err(codes: &[&str]) -> Value {
    json!({"x-error-codes": codes})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

pub fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The `{id}` of an account: 32 lowercase hex digits, as the API makes them.
pub fn account_id_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": "an account id (32 hex digits)",
           "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}})
}

fn job_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "a job id (32 hex digits)",
           "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}})
}

/// `x-apple: true` marks an operation that calls Apple (it can answer Apple's errors).
fn account_paths() -> Value {
    let job = ok("the job (202 while it runs)", r("Job"));
    let job_links = json!({
        "GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/id"}},
        "ResumeJob": {"operationId": "resumeJob", "parameters": {"id": "$response.body#/id"}}});
    let mut refresh_job = job.clone();
    refresh_job["links"] = job_links.clone();
    refresh_job["headers"] =
        json!({"Location": {"description": "the job", "schema": {"type": "string"}}});
    let account_links = |from: &str| {
        json!({
            "GetAccount": {"operationId": "getAccount", "parameters": {"id": from}},
            "RefreshAccount": {"operationId": "refreshAccount", "parameters": {"id": from}},
            "ListUsers": {"operationId": "listUsers", "parameters": {"id": from}},
            "ListAccountLicenses": {"operationId": "listLicenses", "parameters": {"accountId": from}}})
    };
    let id = json!([account_id_param("id")]);
    json!({
        "/api/health": {"get": {"operationId": "health", "summary": "Health: version, key-value store, variables, apple component", "security": [],
            "responses": {"200": ok("healthy", r("Health")), "503": ok("degraded", r("Health"))}}},
        "/api/metrics": {"get": {"operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format 0.0.4), reader or admin key",
            "description": "Per account: vpp_account_seconds_since_last_sync, vpp_account_token_expiry_days, vpp_account_owned, vpp_account_last_apple_error_number, vpp_account_pending_events. Per asset: vpp_asset_licenses{state=total|in_use|available|pending|retired}, vpp_asset_low_licenses. Apple: vpp_apple_calls_total{endpoint}, vpp_apple_errors_total{endpoint,error_number}. Jobs: vpp_jobs{kind,state}, vpp_job_duration_seconds{kind,outcome} (sum, count), vpp_job_duration_seconds_max. vpp_pending_events, vpp_notices_undelivered.",
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/audit": {"get": {"operationId": "listAudit", "summary": "Audit log, newest first, a page per call (admin)",
            "parameters": [{"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_INT}, "description": "follow nextPage; a page that does not exist yet is 404"}],
            "responses": {"200": ok("records", r("AuditPage")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/session": {"get": {"operationId": "getSession", "summary": "Who the presented key is: its role (admin or reader) and the name the audit log records",
            "responses": {"200": ok("the caller", json!({"type": "object", "required": ["role", "caller"], "properties": {"role": {"type": "string", "enum": ["admin", "reader"]}, "caller": {"type": "string"}}}))}}},
        "/api/accounts": {
            "get": {"operationId": "listAccounts", "summary": "Accounts with derived status",
                "responses": {"200": {"description": "accounts",
                    "content": {"application/json": {"schema": {"type": "object", "required": ["accounts"], "properties": {"accounts": {"type": "array", "items": r("Account")}}}}},
                    "links": account_links("$response.body#/accounts/0/id")}}},
            "post": {"operationId": "addAccount", "summary": "Add an account from a server token (.vpptoken content)", "x-apple": true,
                "requestBody": {"required": true, "content": {"application/json": {"schema": r("AddAccount")}}},
                "responses": {"201": {"description": "added; its first full refresh runs as a job (refreshJob; Link: <job URL>; rel=\"refresh-job\")",
                        "content": {"application/json": {"schema": r("AddedAccount")}},
                        "headers": {"Location": {"description": "the account", "schema": {"type": "string"}},
                            "Link": {"description": "<{job URL}>; rel=\"refresh-job\"", "schema": {"type": "string"}}},
                        "links": account_links("$response.body#/id")},
                    "400": err(&["invalid_request"]),
                    "409": err(&["duplicate_location", "owned_by_another_mdm"]),
                    "422": err(&["token_malformed", "token_expired"])}}},
        "/api/accounts/{id}": {
            "parameters": id,
            "get": {"operationId": "getAccount", "summary": "One account", "responses": {"200": ok("account", r("Account")), "404": err(&["not_found"])}},
            "patch": {"operationId": "editAccount", "summary": "Rename and/or replace the token with a renewed one of the same location", "x-apple": true,
                "requestBody": {"required": true, "content": {"application/json": {"schema": r("EditAccount")}}},
                "responses": {"200": ok("changed", r("Account")), "400": err(&["invalid_request"]), "404": err(&["not_found"]),
                    "422": err(&["location_mismatch", "token_malformed", "token_expired"])}},
            "delete": {"operationId": "deleteAccount", "summary": "Delete the account and all its data", "x-apple": true,
                "responses": {"204": {"description": "deleted"}, "404": err(&["not_found"]), "409": err(&["account_in_use", "conflict"])}}},
        "/api/accounts/{id}/test": {"parameters": id, "post": {"operationId": "testAccount", "summary": "Check token and Apple round trip now", "x-apple": true,
            "responses": {"200": ok("checks", r("AccountTest")), "404": err(&["not_found"])}}},
        "/api/accounts/{id}/refresh": {"parameters": id, "post": {"operationId": "refreshAccount", "summary": "Synchronize from Apple (full unless full=false); joins the account's running refresh job if there is one (one job per account and kind)", "x-apple": true,
            "parameters": [{"name": "full", "in": "query", "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}}],
            "responses": {"202": refresh_job.clone(), "400": err(&["invalid_request"]), "404": err(&["not_found"]), "409": err(&["conflict"])}}},
        "/api/accounts/{id}/cleanup": {"parameters": id, "post": {"operationId": "cleanupAccount", "summary": "Revoke the licenses this instance did not assign", "x-apple": true,
            "responses": {"202": refresh_job, "404": err(&["not_found"]), "409": err(&["owned_by_another_mdm", "conflict"])}}},
        "/api/accounts/{id}/reclaim": {"parameters": id, "post": {"operationId": "reclaimAccount", "summary": "Make this instance the location's owner again", "x-apple": true,
            "responses": {"200": ok("account", r("Account")), "404": err(&["not_found"])}}},
        "/api/jobs": {"get": {"operationId": "listJobs", "summary": "Recent jobs with progress and outcome",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_INT}, "description": "at most this many (1 to the jobs kept)"}],
            "responses": {"200": {"description": "jobs",
                "content": {"application/json": {"schema": {"type": "object", "required": ["jobs"], "properties": {"jobs": {"type": "array", "items": r("Job")}}}}},
                "links": {"GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/jobs/0/id"}}}},
                "400": err(&["invalid_request"])}}},
        "/api/jobs/{id}": {"parameters": [job_id_param()], "get": {"operationId": "getJob", "summary": "One job", "responses": {"200": ok("job", r("Job")), "404": err(&["not_found"])}}},
        "/api/jobs/{id}/resume": {"parameters": [job_id_param()], "post": {"operationId": "resumeJob", "summary": "Run the next slice of a refresh or clean-up job now", "x-apple": true,
            "responses": {"200": job.clone(), "202": job, "404": err(&["not_found"]), "409": err(&["conflict"])}}},
        "/api/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "security": [], "responses": {"200": ok("OpenAPI", json!({"type": "object"}))}}}
    })
}

fn account_schemas() -> Value {
    let date = json!({"type": "string", "format": "date-time"});
    let nullable = |t: &str| json!({"type": [t, "null"]});
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok", "degraded"]}, "version": {"type": "string"}, "checks": {"type": "object"}}},
        "Status": {"type": "object", "required": ["code", "severity"], "properties": {
            "code": {"type": "string", "enum": ["healthy", "never_synced", "syncing", "expiring_soon", "expired", "token_rejected", "owned_by_another_mdm", "sync_failed", "apple_rate_limited", "apple_unreachable"]},
            "severity": {"type": "string", "enum": ["ok", "info", "warning", "error"]},
            "description": {"type": "string"}}},
        "Failure": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
        "Account": {"type": "object", "required": ["id", "name", "status", "organization", "expiryDate", "owner", "policies", "notifications"], "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "status": r("Status"),
            "organization": {"type": "string"}, "location": nullable("string"), "locationId": nullable("string"), "country": nullable("string"),
            "lastSynchronized": {"type": ["string", "null"], "format": "date-time"},
            "lastSync": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["at", "ok", "full"], "properties": {
                "at": date, "ok": {"type": "boolean"}, "full": {"type": "boolean"}, "error": r("Failure")}}]},
            "expiryDate": date, "createdAt": date,
            "owner": {"type": "object", "required": ["kind"], "properties": {"kind": {"type": "string", "enum": ["unknown", "unclaimed", "ours", "foreign"]}, "id": {"type": "string"}, "name": {"type": "string"}}},
            "lastAppleError": {"type": ["object", "null"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "number": {"type": "integer"}, "at": date}},
            "lastAppleOkAt": {"type": ["string", "null"], "format": "date-time"},
            "policies": {"type": "array", "items": {"type": "string"}}, "notifications": {"type": "boolean"}}},
        "AccountTest": {"type": "object", "required": ["ok", "checks"], "properties": {"ok": {"type": "boolean"}, "checks": {"type": "array", "items": {"type": "object"}}}},
        "Token": {"type": "string", "minLength": 1, "maxLength": 16384, "pattern": "^\\s*[A-Za-z0-9+/=\\s]+$",
            "contentEncoding": "base64", "contentMediaType": "application/json",
            "description": "The .vpptoken file content: base64 of Apple's JSON {token, expDate, orgName}. A token Apple did not issue, or one that expired, is 422 (token_malformed, token_expired, apple_token_*)."},
        "AccountName": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": "\\S",
            "description": "1 to 100 characters once surrounding white space is trimmed"},
        "AddAccount": {"type": "object", "required": ["name", "token"], "additionalProperties": false,
            "properties": {"name": r("AccountName"), "token": r("Token")}},
        "AddedAccount": {"allOf": [r("Account"), {"type": "object", "properties": {
            "refreshJob": {"type": "object", "description": "the account's first full refresh; absent only when it could not be started",
                "required": ["id", "state", "href"],
                "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": ["running", "succeeded", "failed"]},
                    "progress": r("Progress"), "href": {"type": "string", "description": "GET to follow; POST {href}/resume to continue"}}}}}]},
        "EditAccount": {"type": "object", "additionalProperties": false, "minProperties": 1, "properties": {"name": r("AccountName"), "token": r("Token")}},
        "Progress": {"type": "object", "required": ["phase", "done"], "properties": {"phase": {"type": "string"}, "done": {"type": "integer", "minimum": 0}, "total": {"type": "integer", "minimum": 0}}},
        "Job": {"type": "object", "required": ["id", "kind", "state", "requestedBy", "createdAt", "updatedAt", "progress", "slices"], "properties": {
            "id": {"type": "string"}, "kind": {"type": "string", "enum": ["refresh", "cleanup", "reconcile", "daily", "assign", "revoke", "policy"]},
            "accountId": {"type": "string"}, "state": {"type": "string", "enum": ["running", "succeeded", "failed"]},
            "requestedBy": {"type": "string"}, "createdAt": date, "updatedAt": date, "finishedAt": date,
            "progress": r("Progress"), "slices": {"type": "integer", "minimum": 0}, "checkpoint": {}, "result": {}, "error": r("Failure")}},
        "AuditRecord": {"type": "object", "required": ["at", "actor", "action", "status"], "properties": {
            "at": date, "actor": {"type": "string"}, "action": {"type": "string"}, "target": {"type": ["string", "null"]},
            "status": {"type": "integer"}, "error": {"type": ["string", "null"]}}},
        "AuditPage": {"type": "object", "required": ["records"], "properties": {"records": {"type": "array", "items": r("AuditRecord")}, "nextPage": {"type": ["integer", "null"], "minimum": 0}}}
    })
}

fn merge(into: &mut Map<String, Value>, from: Value) {
    if let Value::Object(m) = from {
        into.extend(m);
    }
}

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

/// Every operation: `(path, method)`.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (p, item) in paths {
            for m in METHODS {
                if item.get(m).is_some() {
                    out.push((p.clone(), m.to_string()));
                }
            }
        }
    }
    out
}

/// Add `codes` to the error response `status` of `responses`, creating it when missing.
fn add_error(responses: &mut Map<String, Value>, status: &str, codes: &[&str]) {
    let entry = responses
        .entry(status.to_string())
        .or_insert_with(|| err(&[]));
    let list = entry
        .as_object_mut()
        .map(|o| o.entry("x-error-codes").or_insert_with(|| json!([])));
    if let Some(Value::Array(list)) = list {
        for c in codes {
            if !list.iter().any(|v| v == c) {
                list.push(json!(c));
            }
        }
    }
}

/// Turn each response's `x-error-codes` into its description and a schema whose code is one of
/// them.
fn finish_errors(responses: &mut Map<String, Value>) {
    for (status, resp) in responses.iter_mut() {
        let Some(codes) = resp.get("x-error-codes").and_then(Value::as_array).cloned() else {
            continue;
        };
        let names: Vec<&str> = codes.iter().filter_map(Value::as_str).collect();
        let schema = json!({"allOf": [r("Error"), {"type": "object", "properties": {"error": {"type": "object",
            "properties": {"code": {"type": "string", "enum": names}}}}}]});
        let mut content = json!({"application/json": {"schema": schema}});
        if status == "405" {
            content = json!({"application/json": {"schema": r("Error")}});
        }
        resp["description"] = json!(format!("error; codes: {}", names.join(", ")));
        resp["content"] = content;
        if status == "429" || status == "503" {
            resp["headers"] = json!({"Retry-After": {"description": "seconds to wait, when known", "schema": {"type": "string"}}});
        }
    }
}

/// Add what every operation shares (see the module documentation).
fn complete(paths: &mut Map<String, Value>) {
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for m in METHODS {
            let Some(op) = item.get_mut(m).and_then(Value::as_object_mut) else {
                continue;
            };
            let public = op.get("security") == Some(&json!([]));
            let has_body = op.contains_key("requestBody");
            let apple = op.remove("x-apple") == Some(json!(true));
            // Reading is open to the reader key, except the audit log; every change needs admin.
            let admin_only = m != "get" || path == "/api/audit";
            let mut responses = op
                .remove("responses")
                .and_then(|r| r.as_object().cloned())
                .unwrap_or_default();
            if !public {
                add_error(&mut responses, "401", &["unauthorized"]);
                if admin_only {
                    add_error(&mut responses, "403", &["forbidden"]);
                }
            }
            if has_body {
                add_error(&mut responses, "400", &["invalid_json", "invalid_request"]);
                add_error(&mut responses, "413", &["payload_too_large"]);
            }
            if apple {
                add_error(
                    &mut responses,
                    "422",
                    &[
                        "apple_token_expired",
                        "apple_token_revoked",
                        "apple_token_invalid",
                        "apple_rejected",
                    ],
                );
                add_error(&mut responses, "429", &["apple_rate_limited"]);
                add_error(&mut responses, "502", &["apple_unavailable"]);
            }
            if path != "/api/health" && path != "/api/openapi.json" {
                add_error(
                    &mut responses,
                    "503",
                    &["store_unavailable", "misconfigured"],
                );
            }
            finish_errors(&mut responses);
            op.insert("responses".into(), Value::Object(responses));
        }
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    merge(&mut paths, account_paths());
    merge(&mut paths, crate::licenses_openapi::paths());
    complete(&mut paths);
    let mut schemas = Map::new();
    merge(&mut schemas, crate::licenses_openapi::schemas());
    merge(&mut schemas, account_schemas());
    json!({
        "openapi": "3.1.0",
        "info": {"title": "vpp-spin", "version": crate::VERSION,
            "description": "Apple Apps and Books license manager. Every /api route except /api/health and /api/openapi.json needs Authorization: Bearer <key> (the admin key, or the reader key for reading); errors are {\"error\": {code, message, details}}; a method a path does not support is 405 with an Allow header; bodies over 1 MiB are 413."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "admin_api_key (everything) or reader_api_key (reading only)"},
                "scheduler": {"type": "http", "scheme": "bearer", "description": "scheduler_api_key: runs the daily work (POST /api/daily)"},
                "appleNotification": {"type": "http", "scheme": "bearer", "description": "the secret this app gave Apple for an account's notifications"}
            },
            "schemas": schemas}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_every_fixed_path() {
        let d = document();
        for p in [
            "/api/accounts",
            "/api/accounts/{id}/cleanup",
            "/api/licenses",
            "/api/assignments",
            "/api/policies/{id}",
            "/api/settings",
            "/api/notices",
            "/api/jobs/{id}",
            "/api/metrics",
            "/api/daily",
            "/api/session",
        ] {
            assert!(d["paths"].get(p).is_some(), "{p} missing");
        }
        assert!(d["components"]["schemas"]["Error"].is_object());
        assert_eq!(
            d["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn every_protected_operation_documents_401_and_every_change_403() {
        let d = document();
        for (path, m) in operations(&d) {
            let op = &d["paths"][&path][&m];
            let responses = op["responses"].as_object().unwrap();
            let public = op.get("security") == Some(&json!([]));
            assert_eq!(!public, responses.contains_key("401"), "{m} {path}: 401");
            if m != "get" && !public {
                assert!(responses.contains_key("403"), "{m} {path}: 403");
            }
            assert!(op["operationId"].is_string(), "{m} {path}: operationId");
            for (status, r) in responses {
                assert!(r["description"].is_string(), "{m} {path} {status}");
                assert!(
                    r.get("x-error-codes").is_some() == status.starts_with(['4', '5'])
                        || r.get("content").is_some()
                        || status == "204",
                    "{m} {path} {status}"
                );
            }
        }
    }

    #[test]
    fn every_link_names_an_operation_that_exists() {
        let d = document();
        let ids: Vec<String> = operations(&d)
            .iter()
            .map(|(p, m)| {
                d["paths"][p][m]["operationId"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let mut links = 0;
        for (path, m) in operations(&d) {
            for (status, r) in d["paths"][&path][&m]["responses"].as_object().unwrap() {
                for (name, link) in r["links"].as_object().into_iter().flatten() {
                    let target = link["operationId"].as_str().unwrap();
                    assert!(
                        ids.iter().any(|i| i == target),
                        "{m} {path} {status} {name} -> {target}"
                    );
                    links += 1;
                }
            }
        }
        assert!(links >= 8, "{links} links");
    }

    #[test]
    fn error_responses_list_their_codes_in_the_schema() {
        let d = document();
        let r = &d["paths"]["/api/accounts"]["post"]["responses"]["409"];
        let codes = &r["content"]["application/json"]["schema"]["allOf"][1]["properties"]["error"]
            ["properties"]["code"]["enum"];
        assert_eq!(
            codes,
            &json!(["duplicate_location", "owned_by_another_mdm"])
        );
        assert!(d["paths"]["/api/accounts"]["post"]["responses"]["413"].is_object());
    }
}
