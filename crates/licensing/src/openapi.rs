//! The OpenAPI 3.1 description of the whole API, served at `GET /api/openapi.json`.
//! Account, job, audit and health routes are described here; licenses routes come from
//! [`crate::licenses_openapi`].

use serde_json::{json, Map, Value};

fn err(codes: &[&str]) -> Value {
    json!({"description": format!("error; codes: {}", codes.join(", ")),
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn id() -> Value {
    json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}])
}

fn account_paths() -> Value {
    let job = ok("the job (202 while it runs)", r("Job"));
    json!({
        "/api/health": {"get": {"summary": "Health: version, key-value store, variables, apple component", "security": [],
            "responses": {"200": ok("healthy", json!({"type": "object"})), "503": ok("degraded", json!({"type": "object"}))}}},
        "/api/session": {"get": {"summary": "Who the presented key is: its role (admin or reader) and the name the audit log records",
            "responses": {"200": ok("the caller", json!({"type": "object", "properties": {"role": {"type": "string", "enum": ["admin", "reader"]}, "caller": {"type": "string"}}})), "401": err(&["unauthorized"])}}},
        "/api/audit": {"get": {"summary": "Audit log, newest first, a page per call (admin)",
            "parameters": [{"name": "page", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": ok("records", json!({"type": "object", "properties": {"records": {"type": "array", "items": r("AuditRecord")}, "nextPage": {"type": "integer"}}})), "403": err(&["forbidden"])}}},
        "/api/accounts": {
            "get": {"summary": "Accounts with derived status", "responses": {"200": ok("accounts", json!({"type": "object", "properties": {"accounts": {"type": "array", "items": r("Account")}}}))}},
            "post": {"summary": "Add an account from a server token (.vpptoken content)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": r("AddAccount")}}},
                "responses": {"201": ok("added", r("Account")),
                    "400": err(&["invalid_json", "invalid_request"]),
                    "409": err(&["duplicate_location"]),
                    "422": err(&["token_malformed", "token_expired", "apple_token_expired", "apple_token_revoked", "apple_token_invalid", "apple_rejected"]),
                    "429": err(&["apple_rate_limited"]), "502": err(&["apple_unavailable"])}}},
        "/api/accounts/{id}": {
            "parameters": id(),
            "get": {"summary": "One account", "responses": {"200": ok("account", r("Account")), "404": err(&["not_found"])}},
            "patch": {"summary": "Rename and/or replace the token with a renewed one of the same location",
                "requestBody": {"required": true, "content": {"application/json": {"schema": r("EditAccount")}}},
                "responses": {"200": ok("changed", r("Account")), "422": err(&["location_mismatch", "token_malformed", "token_expired"])}},
            "delete": {"summary": "Delete the account and all its data", "responses": {"204": {"description": "deleted"}, "409": err(&["account_in_use", "conflict"])}}},
        "/api/accounts/{id}/test": {"parameters": id(), "post": {"summary": "Check token and Apple round trip now",
            "responses": {"200": ok("checks", json!({"type": "object", "properties": {"ok": {"type": "boolean"}, "checks": {"type": "array"}}}))}}},
        "/api/accounts/{id}/refresh": {"parameters": id(), "post": {"summary": "Synchronize from Apple (full unless full=false)",
            "responses": {"202": job.clone()}}},
        "/api/accounts/{id}/cleanup": {"parameters": id(), "post": {"summary": "Revoke the licenses this instance did not assign",
            "responses": {"202": job.clone(), "409": err(&["owned_by_another_mdm"])}}},
        "/api/accounts/{id}/reclaim": {"parameters": id(), "post": {"summary": "Make this instance the location's owner again",
            "responses": {"200": ok("account", r("Account"))}}},
        "/api/jobs": {"get": {"summary": "Recent jobs with progress and outcome",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": ok("jobs", json!({"type": "object", "properties": {"jobs": {"type": "array", "items": r("Job")}}}))}}},
        "/api/jobs/{id}": {"parameters": id(), "get": {"summary": "One job", "responses": {"200": ok("job", r("Job")), "404": err(&["not_found"])}}},
        "/api/jobs/{id}/resume": {"parameters": id(), "post": {"summary": "Run the next slice of a refresh or clean-up job now", "responses": {"200": job.clone(), "202": job}}},
        "/api/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok("OpenAPI", json!({"type": "object"}))}}}
    })
}

fn account_schemas() -> Value {
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}}},
        "Status": {"type": "object", "properties": {
            "code": {"type": "string", "enum": ["healthy", "never_synced", "syncing", "expiring_soon", "expired", "token_rejected", "owned_by_another_mdm", "sync_failed", "apple_rate_limited", "apple_unreachable"]},
            "severity": {"type": "string", "enum": ["ok", "info", "warning", "error"]},
            "description": {"type": "string"}}},
        "Account": {"type": "object", "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "status": r("Status"),
            "organization": {"type": "string"}, "location": {"type": ["string", "null"]}, "locationId": {"type": ["string", "null"]},
            "lastSynchronized": {"type": ["string", "null"], "format": "date-time"}, "expiryDate": {"type": "string", "format": "date-time"},
            "owner": {"type": "object"},
            "lastAppleError": {"type": ["object", "null"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "number": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}}},
            "lastAppleOkAt": {"type": ["string", "null"], "format": "date-time"},
            "policies": {"type": "array", "items": {"type": "string"}}, "notifications": {"type": "boolean"}}},
        "AddAccount": {"type": "object", "required": ["name", "token"], "additionalProperties": false,
            "properties": {"name": {"type": "string", "maxLength": 100}, "token": {"type": "string", "description": "the .vpptoken file content"}}},
        "EditAccount": {"type": "object", "additionalProperties": false, "properties": {"name": {"type": "string"}, "token": {"type": "string"}}},
        "Job": {"type": "object", "properties": {
            "id": {"type": "string"}, "kind": {"type": "string", "enum": ["refresh", "cleanup", "reconcile", "daily"]},
            "accountId": {"type": "string"}, "state": {"type": "string", "enum": ["running", "succeeded", "failed"]},
            "progress": {"type": "object"}, "slices": {"type": "integer"}, "result": {"type": "object"}, "error": {"type": "object"}}},
        "AuditRecord": {"type": "object", "properties": {"at": {"type": "string"}, "actor": {"type": "string"}, "action": {"type": "string"}, "status": {"type": "integer"}, "error": {"type": "string"}}}
    })
}

fn merge(into: &mut Map<String, Value>, from: Value) {
    if let Value::Object(m) = from {
        into.extend(m);
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    merge(&mut paths, account_paths());
    merge(&mut paths, crate::licenses_openapi::paths());
    let mut schemas = Map::new();
    merge(&mut schemas, crate::licenses_openapi::schemas());
    merge(&mut schemas, account_schemas());
    json!({
        "openapi": "3.1.0",
        "info": {"title": "vpp-spin", "version": crate::VERSION,
            "description": "Apple Apps and Books license manager. Every /api route except /api/health needs Authorization: Bearer <key>; errors are {\"error\": {code, message, details}}."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": schemas}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_lists_every_fixed_path() {
        let d = super::document();
        for p in [
            "/api/accounts",
            "/api/accounts/{id}/cleanup",
            "/api/licenses",
            "/api/assignments",
            "/api/policies/{id}",
            "/api/settings",
            "/api/notices",
            "/api/jobs/{id}",
            "/api/session",
        ] {
            assert!(d["paths"].get(p).is_some(), "{p} missing");
        }
        assert!(d["components"]["schemas"]["Error"].is_object());
    }
}
