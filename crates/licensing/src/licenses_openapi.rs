//! The OpenAPI description of the licenses routes (and the managed-users routes served by the
//! accounts component). Merge [`paths`] into the document's `paths` and [`schemas`] into
//! `components.schemas`; errors use the shared `Error` schema.

use serde_json::{json, Value};

fn err(codes: &[&str]) -> Value {
    json!({"description": format!("error; codes: {}", codes.join(", ")),
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(schema: Value) -> Value {
    json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": r(name)}}})
}

fn param(name: &str, at: &str, ty: &str, description: &str) -> Value {
    json!({"name": name, "in": at, "required": at == "path", "schema": {"type": ty}, "description": description})
}

pub fn paths() -> Value {
    let admin = json!([{"bearer": []}]);
    json!({
        "/api/licenses": {"get": {
            "summary": "One row per asset with counts and a low-license flag (reader key allowed)",
            "parameters": [
                param("accountId", "query", "string", "only this account"),
                param("search", "query", "string", "case-insensitive part of the name or adamId"),
                param("low", "query", "boolean", "only assets at or below the low-license threshold"),
                param("format", "query", "string", "csv for a CSV export (or send Accept: text/csv)"),
            ],
            "responses": {
                "200": {"description": "OK", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {"licenses": {"type": "array", "items": r("LicenseRow")}}}},
                    "text/csv": {"schema": {"type": "string"}}}},
                "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/licenses/{accountId}/{adamId}/assignments": {"get": {
            "summary": "A page of an asset's assignments, each with who made it",
            "parameters": [
                param("accountId", "path", "string", ""), param("adamId", "path", "string", ""),
                param("pricingParam", "query", "string", "STDQ (default) or PLUS"),
                param("page", "query", "integer", "0-based; follow nextPage"),
            ],
            "responses": {"200": ok(r("AssignmentsPage")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/assignments": {"post": {
            "summary": "Assign an asset to devices or users (ledger first; all fit or nothing is asked)",
            "security": admin, "requestBody": body("AssignRequest"),
            "responses": {"202": ok(r("Submitted")), "200": ok(r("Submitted")),
                "400": err(&["invalid_request", "invalid_json"]), "404": err(&["not_found"]),
                "409": err(&["no_licenses_available"]), "422": err(&["unprocessable", "apple_rejected"]),
                "429": err(&["apple_rate_limited"]), "502": err(&["apple_unavailable"])}}},
        "/api/assignments/revoke": {"post": {
            "summary": "Take an asset from devices or users (Apple's disassociate; other assets stay)",
            "security": admin, "requestBody": body("AssignRequest"),
            "responses": {"202": ok(r("Submitted")), "400": err(&["invalid_request"]), "404": err(&["not_found"])}}},
        "/api/events/{id}": {"get": {
            "summary": "Apple's outcome of an event, per device or user (polls Apple when due: >= 30 s apart)",
            "parameters": [param("id", "path", "string", "Apple's eventId")],
            "responses": {"200": ok(r("Event")), "404": err(&["not_found"])}}},
        "/api/policies": {"get": {"summary": "All app policies",
            "responses": {"200": ok(json!({"type": "object", "properties": {"policies": {"type": "array", "items": r("Policy")}}}))}}},
        "/api/policies/{id}": {
            "get": {"summary": "One app policy", "parameters": [param("id", "path", "string", "")],
                "responses": {"200": ok(r("Policy")), "404": err(&["not_found"])}},
            "put": {"summary": "Create or replace a policy (the desired state); assigns what is missing as far as licenses allow",
                "security": admin, "parameters": [param("id", "path", "string", "1-64 of [A-Za-z0-9._-]")],
                "requestBody": body("PolicyRequest"),
                "responses": {"200": ok(r("PolicyResult")), "201": ok(r("PolicyResult")),
                    "400": err(&["invalid_request", "invalid_json"]), "404": err(&["not_found"]), "422": err(&["unprocessable"])}},
            "delete": {"summary": "Delete a policy (its licenses stay until reconcile)", "security": admin,
                "parameters": [param("id", "path", "string", "")],
                "responses": {"204": {"description": "deleted"}, "404": err(&["not_found"])}}},
        "/api/reconcile": {"post": {
            "summary": "Start (or continue) the reconcile job over all accounts; see GET /api/jobs/{id}",
            "security": admin, "responses": {"202": ok(r("Job"))}}},
        "/api/settings": {
            "get": {"summary": "License settings", "responses": {"200": ok(r("Settings"))}},
            "put": {"summary": "Change settings (fields left out keep their value)", "security": admin,
                "requestBody": body("SettingsRequest"),
                "responses": {"200": ok(r("Settings")), "400": err(&["invalid_request", "invalid_json"])}}},
        "/api/notices": {"get": {
            "summary": "License-removal notices, newest first, a page at a time",
            "parameters": [param("page", "query", "integer", "follow nextPage")],
            "responses": {"200": ok(r("NoticePage")), "400": err(&["invalid_request"])}}},
        "/api/notices/deliver": {"post": {
            "summary": "Deliver pending notices to the webhook now. Body sent: {notices:[Notice]}; header X-VPP-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>",
            "security": admin, "responses": {"200": ok(json!({"type": "object"}))}}},
        "/api/apple/notifications/{accountId}": {"post": {
            "summary": "Apple's notifications. Authorization: Bearer <the account's notification token> (no API key). Deduplicated on notificationId.",
            "security": [],
            "parameters": [param("accountId", "path", "string", "")],
            "responses": {"200": ok(json!({"type": "object"})), "400": err(&["invalid_json", "invalid_request"]), "401": err(&["unauthorized"])}}},
        "/api/accounts/{id}/users": {
            "get": {"summary": "Managed users, a page at a time (with invitation links)",
                "parameters": [param("id", "path", "string", ""), param("page", "query", "integer", "")],
                "responses": {"200": ok(json!({"type": "object"})), "404": err(&["not_found"])}},
            "post": {"summary": "Register users with Apple: {clientUserId, email?, managedAppleId?} or {users:[...]}",
                "security": admin, "parameters": [param("id", "path", "string", "")],
                "responses": {"202": ok(json!({"type": "object"})), "400": err(&["invalid_request", "invalid_json"])}}},
        "/api/accounts/{id}/users/{clientUserId}": {"get": {"summary": "One managed user with its invitation link",
            "parameters": [param("id", "path", "string", ""), param("clientUserId", "path", "string", "")],
            "responses": {"200": ok(json!({"type": "object"})), "404": err(&["not_found"])}}},
        "/api/accounts/{id}/users/{clientUserId}/retire": {"post": {"summary": "Retire a user (Apple frees its licenses)",
            "security": admin,
            "parameters": [param("id", "path", "string", ""), param("clientUserId", "path", "string", "")],
            "responses": {"202": ok(json!({"type": "object"}))}}},
    })
}

pub fn schemas() -> Value {
    let s = |t: &str| json!({"type": t});
    let subject = json!({"type": "object", "properties": {"serialNumber": s("string"), "clientUserId": s("string")}});
    json!({
        "LicenseRow": {"type": "object", "properties": {
            "accountId": s("string"), "accountName": s("string"), "adamId": s("string"), "pricingParam": s("string"),
            "name": s("string"), "iconUrl": s("string"), "productType": s("string"), "total": s("integer"), "available": s("integer"),
            "inUse": s("integer"), "retired": s("integer"), "pending": s("integer"), "unlimited": s("boolean"),
            "lowLicenses": s("boolean"), "deviceAssignable": s("boolean"), "revocable": s("boolean")}},
        "AssignmentsPage": {"type": "object", "properties": {
            "page": s("integer"), "pages": s("integer"), "nextPage": s("integer"),
            "assignments": {"type": "array", "items": {"type": "object", "properties": {
                "serialNumber": s("string"), "clientUserId": s("string"),
                "madeBy": {"type": "string", "enum": ["thisInstance", "foreign"]}, "eventId": s("string"), "at": s("string")}}}}},
        "AssignRequest": {"type": "object", "required": ["accountId", "adamId"], "properties": {
            "accountId": s("string"), "adamId": s("string"), "pricingParam": {"type": "string", "enum": ["STDQ", "PLUS"]},
            "serialNumbers": {"type": "array", "items": s("string")}, "clientUserIds": {"type": "array", "items": s("string")}}},
        "Submitted": {"type": "object", "properties": {
            "eventId": s("string"), "events": {"type": "array", "items": r("Event")},
            "alreadyAssigned": {"type": "array", "items": subject}, "rejected": {"type": "array", "items": subject}}},
        "Event": {"type": "object", "properties": {
            "id": s("string"), "accountId": s("string"), "kind": {"type": "string", "enum": ["associate", "disassociate", "revoke"]},
            "source": s("string"), "state": {"type": "string", "enum": ["pending", "complete", "failed"]},
            "numRequested": s("integer"), "numCompleted": s("integer"),
            "results": {"type": "array", "items": {"type": "object", "properties": {
                "serialNumber": s("string"), "clientUserId": s("string"),
                "state": {"type": "string", "enum": ["pending", "succeeded", "failed"]},
                "error": {"type": "object", "properties": {"appleErrorNumber": s("integer"), "message": s("string")}}}}}}},
        "PolicyRequest": {"type": "object", "required": ["name", "accountId", "assets"], "properties": {
            "name": s("string"), "accountId": s("string"),
            "assets": {"type": "array", "items": {"type": "object", "properties": {"adamId": s("string"), "pricingParam": s("string")}}},
            "serialNumbers": {"type": "array", "items": s("string")}, "clientUserIds": {"type": "array", "items": s("string")}}},
        "Policy": {"allOf": [r("PolicyRequest"), {"type": "object", "properties": {"id": s("string"), "createdAt": s("string"), "updatedAt": s("string")}}]},
        "PolicyResult": {"type": "object", "properties": {"policy": r("Policy"), "assignments": {"type": "array", "items": {"type": "object", "properties": {
            "adamId": s("string"), "wanted": s("integer"), "alreadyAssigned": s("integer"), "requested": s("integer"),
            "shortfall": s("integer"), "shortfallSubjects": {"type": "array", "items": subject}, "eventIds": {"type": "array", "items": s("string")}}}}}},
        "Settings": {"type": "object", "properties": {
            "licenseRemovalNotification": s("boolean"), "lowLicenseThreshold": s("integer"),
            "noticeWebhookUrl": s("string"), "noticeWebhookSecretSet": s("boolean")}},
        "SettingsRequest": {"type": "object", "properties": {
            "licenseRemovalNotification": s("boolean"), "lowLicenseThreshold": s("integer"),
            "noticeWebhookUrl": {"type": "string", "nullable": true}, "noticeWebhookSecret": {"type": "string", "minLength": 16}}},
        "NoticePage": {"type": "object", "properties": {
            "notices": {"type": "array", "items": {"type": "object", "properties": {
                "id": s("string"), "accountId": s("string"), "adamId": s("string"), "pricingParam": s("string"),
                "serialNumber": s("string"), "clientUserId": s("string"), "reason": s("string"), "at": s("string"), "deliveredAt": s("string")}}},
            "nextPage": s("integer"), "undelivered": s("integer"), "lastDeliveryError": s("string")}},
    })
}
