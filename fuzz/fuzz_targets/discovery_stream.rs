//! A destination stream that sends nonsense: any bytes as a
//! `DiscoveryResponse`, and what decodes compiled into a proxy's policy,
//! endpoints parsed, problems reported, requests routed. Nothing panics.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sidemesh_proto::destination::v1 as pb;
use sidemesh_proxy::endpoint::Endpoint;
use sidemesh_proxy::policy::ServicePolicy;
use sidemesh_proxy::retry::Budget;

fuzz_target!(|data: &[u8]| {
    let Ok(rsp) = pb::DiscoveryResponse::decode(data) else {
        return;
    };
    match rsp.result {
        Some(pb::discovery_response::Result::Service(svc)) => {
            let policy = ServicePolicy::compile(svc, Arc::new(Budget::new(0.2, 10, Duration::from_secs(10))));
            policy.warn_new_problems(None);
            policy.warn_new_problems(Some(&policy));
            let req = http::Request::get("/a/b?c=d")
                .header("x-a", "b")
                .body(())
                .expect("request");
            if let Some(rule) = policy.select(&req) {
                for b in &rule.backends {
                    let _ = policy.endpoints(&b.key);
                }
            }
        }
        Some(pb::discovery_response::Result::Pod(ep)) => {
            Endpoint::from(ep).warn_if_unusable();
        }
        _ => {}
    }
});
