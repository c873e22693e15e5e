//! One AdmissionReview (admission.k8s.io/v1) in, the response out: a pure
//! function over bytes, so the tests run the exact logic the server runs.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{json, Value};

use crate::inject::{inject, InjectorConfig, Request, INJECT_LABEL};

/// The answer and how to count it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reviewed {
    /// The whole AdmissionReview to send back.
    pub review: Value,
    /// `injected`, `skipped` or `error` (the metric's `result`).
    pub result: &'static str,
    /// A skip reason, `internal`, or `none` (the metric's `reason`).
    pub reason: &'static str,
}

/// Answers one review. `namespace_enabled` says the webhook entry that
/// called us selected namespaces labelled `portcullis.io/inject=enabled`
/// (the request itself carries no namespace labels). `Err` means the body is
/// not an AdmissionReview v1 request: the server answers 400.
pub fn review(
    body: &[u8],
    namespace_enabled: bool,
    cfg: &InjectorConfig,
) -> Result<Reviewed, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["apiVersion"] != "admission.k8s.io/v1" || v["kind"] != "AdmissionReview" {
        return Err("not an admission.k8s.io/v1 AdmissionReview".into());
    }
    let req = &v["request"];
    let uid = req["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or("request.uid is missing")?;
    let kind = req["kind"]["kind"]
        .as_str()
        .ok_or("request.kind.kind is missing")?;
    let operation = req["operation"]
        .as_str()
        .ok_or("request.operation is missing")?;
    let object = &req["object"];
    let namespace = req["namespace"]
        .as_str()
        .or(object["metadata"]["namespace"].as_str())
        .unwrap_or("default");
    let mut ns_labels = BTreeMap::new();
    if namespace_enabled {
        ns_labels.insert(INJECT_LABEL.to_string(), "enabled".to_string());
    }
    let request = Request {
        kind,
        operation,
        sub_resource: req["subResource"].as_str().unwrap_or(""),
        namespace,
        namespace_labels: &ns_labels,
        pod: object,
        job: false,
    };
    let mut response = json!({"uid": uid, "allowed": true});
    let (result, reason, warnings) = match inject(&request, cfg) {
        Ok(inj) => {
            if !inj.patch.0.is_empty() {
                let bytes = serde_json::to_vec(&inj.patch).expect("a patch serializes");
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
            match inj.skipped {
                None => ("injected", "none", inj.warnings),
                Some(s) => ("skipped", s.as_str(), inj.warnings),
            }
        }
        Err(e) if cfg.deny_on_error => {
            response["allowed"] = json!(false);
            response["status"] =
                json!({"code": 500, "message": format!("portcullis: injection failed: {e}")});
            ("error", "internal", Vec::new())
        }
        Err(e) => (
            "error",
            "internal",
            vec![format!("not injected: internal error: {e}")],
        ),
    };
    if !warnings.is_empty() {
        let w: Vec<String> = warnings
            .iter()
            .map(|w| format!("portcullis: {w}"))
            .collect();
        response["warnings"] = json!(w);
    }
    Ok(Reviewed {
        review: json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
        result,
        reason,
    })
}
