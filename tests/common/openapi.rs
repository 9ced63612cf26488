//! Real answers checked against the served OpenAPI document.
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{json, Value};

/// Validates `body`, the answer of `method path` with `status` and `content_type`, against
/// the schema that the served OpenAPI document gives for it; panics naming the violation
/// (or the undocumented status or content type).
pub fn assert_documented(
    spec: &Value,
    (method, path): (&str, &str),
    status: StatusCode,
    content_type: &str,
    body: &Value,
) {
    let response = &spec["paths"][path][method]["responses"][status.as_str()];
    let schema = &response["content"][content_type]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path}: {status} as {content_type} is undocumented: {response}"
    );
    // The schema with the document's components beside it, so its references resolve.
    let mut root = schema.clone();
    root["components"] = spec["components"].clone();
    root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    let validator = jsonschema::validator_for(&root).unwrap();
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} ({content_type}) violates the document: {errors:?}\n{body}"
    );
}

/// Validates `body` against the document's component schema `name`.
pub fn assert_component(spec: &Value, name: &str, body: &Value) {
    let root = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": spec["components"].clone(),
        "$schema": "https://json-schema.org/draft/2020-12/schema",
    });
    assert!(
        spec["components"]["schemas"][name].is_object(),
        "the document has no schema {name}"
    );
    let validator = jsonschema::validator_for(&root).unwrap();
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{body} is not a {name}: {errors:?}");
}
