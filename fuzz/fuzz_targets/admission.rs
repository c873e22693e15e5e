//! AdmissionReview handling in the webhook: JSON parsing, the pod checks,
//! annotation parsing, probe rewriting and the JSON patch, as `review`
//! runs them for the server.
//!
//! Checked beyond "does not panic": an answer always carries the request's
//! uid, and a patch it returns is valid base64 of a JSON patch that applies
//! cleanly to the reviewed object (the API server would reject the pod
//! otherwise).
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use portcullis::inject::webhook::review::review;
use portcullis::inject::InjectorConfig;

fuzz_target!(|data: &[u8]| {
    let mut cfg = InjectorConfig::default();
    for namespace_enabled in [false, true] {
        cfg.deny_on_error = namespace_enabled;
        cfg.native_sidecar = !namespace_enabled;
        let Ok(answer) = review(data, namespace_enabled, &cfg) else {
            continue;
        };
        let request: serde_json::Value =
            serde_json::from_slice(data).expect("review parsed it, so it is JSON");
        let response = &answer.review["response"];
        assert_eq!(response["uid"], request["request"]["uid"]);
        let Some(patch) = response["patch"].as_str() else {
            continue;
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("the patch is base64");
        let patch: json_patch::Patch =
            serde_json::from_slice(&bytes).expect("the patch is a JSON patch");
        let mut object = request["request"]["object"].clone();
        if let Err(e) = json_patch::patch(&mut object, &patch) {
            panic!("the patch does not apply to the object: {e}");
        }
    }
});
