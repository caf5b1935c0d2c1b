//! The injector's input surface: whatever body reaches `POST /inject`, and
//! whatever values the override annotations hold. Never a panic; an
//! injected answer always carries a base64 JSON Patch that applies to the Pod
//! it was made for, and re-reviewing the patched Pod changes nothing.
#![no_main]

use std::collections::BTreeMap;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sidemesh_injector::InjectorConfig;
use sidemesh_injector::annotations::{self, Layered, Overrides};
use sidemesh_injector::review::{self, StaticNamespaces};

fn namespaces() -> StaticNamespaces {
    let mut m = BTreeMap::new();
    for (name, value) in [("apps", "enabled"), ("off", "disabled"), ("odd", "maybe")] {
        m.insert(
            name.to_owned(),
            BTreeMap::from([(annotations::INJECT.to_owned(), value.to_owned())]),
        );
    }
    StaticNamespaces(m)
}

fuzz_target!(|data: &[u8]| {
    let config = InjectorConfig::default();
    let ns = namespaces();
    // 1. The whole body, as the webhook sees it.
    if let Ok((answer, verdict)) = review::handle_static(&config, &ns, data) {
        let answer: Value = serde_json::from_slice(&answer).expect("the answer is JSON");
        assert_eq!(answer["kind"], "AdmissionReview");
        if verdict.outcome == "injected" {
            let patch = answer["response"]["patch"].as_str().expect("patch is a base64 string");
            let patch = base64::engine::general_purpose::STANDARD.decode(patch).expect("base64");
            let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
            let request: Value = serde_json::from_slice(data).expect("was parsed once");
            let mut pod = request["request"]["object"].clone();
            json_patch::patch(&mut pod, &patch).expect("the patch applies");
            let mut again = request.clone();
            again["request"]["object"] = pod;
            let body = serde_json::to_vec(&again).expect("json");
            let (_, verdict) = review::handle_static(&config, &ns, &body).expect("still a review");
            assert_eq!(verdict.reason, "already-injected");
        }
    }
    // 2. The bytes as annotation values, each override in turn, on the Pod
    //    and on the Namespace.
    if let Ok(text) = std::str::from_utf8(data) {
        for key in annotations::OVERRIDES.iter().chain([&annotations::INJECT]) {
            let map = BTreeMap::from([((*key).to_owned(), text.to_owned())]);
            let _ = Overrides::from_annotations(Layered {
                pod: Some(&map),
                namespace: None,
            });
            if let Err(e) = Overrides::from_annotations(Layered {
                pod: None,
                namespace: Some(("ns", &map)),
            }) {
                assert_eq!(e.annotation, *key);
                let message = e.to_string();
                assert!(message.contains(key));
            }
            let _ = annotations::parse_inject(text, annotations::Origin::Pod);
        }
    }
});
