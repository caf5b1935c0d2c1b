//! The identity service's CSR path: parse and verify, then, for CSRs the
//! service would accept, sign a leaf with a real issuer.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sidemesh_identity::issuer::Issuer;
use sidemesh_identity_client::{SpiffeId, TrustBundle};

fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let root = sidemesh_identity::ca::new_root("cluster.local", Duration::from_secs(86400)).expect("root");
        let issuer =
            sidemesh_identity::ca::new_issuer(&root.cert, &root.key, Duration::from_secs(3600)).expect("issuer");
        let bundle = TrustBundle::from_pem(root.cert.as_bytes()).expect("bundle");
        Issuer::from_pem(issuer.cert.as_bytes(), issuer.key.as_bytes(), &bundle).expect("issuer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(csr) = sidemesh_identity::csr::check(data) else {
        return;
    };
    if csr.other_sans || csr.uris.len() != 1 {
        return;
    }
    let Ok(id) = csr.uris[0].parse::<SpiffeId>() else {
        return;
    };
    issuer()
        .sign(&id, &[], &csr.public_key, Duration::from_secs(60))
        .expect("a checked CSR for a valid SPIFFE ID must be signable");
});
