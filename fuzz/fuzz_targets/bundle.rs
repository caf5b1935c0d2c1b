//! Trust bundle parsing: whatever a ConfigMap holds, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = sidemesh_identity_client::TrustBundle::from_pem(data) {
        assert!(!bundle.roots().is_empty());
        let again = sidemesh_identity_client::TrustBundle::from_pem(bundle.to_pem().as_bytes()).expect("round trip");
        assert_eq!(again.fingerprints(), bundle.fingerprints());
    }
});
