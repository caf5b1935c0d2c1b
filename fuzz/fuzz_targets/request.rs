//! What the proxy does with bytes and requests from applications and peers:
//! protocol detection on first bytes (a verdict, once given, never changes
//! as more bytes arrive), and the request rewrites between an application
//! and the mesh (`to_mesh` then `to_app` gives the application back the
//! request it would have got: its version, path and host, no hop-by-hop
//! headers). Nothing panics.
#![no_main]

use http::{HeaderName, HeaderValue, Method, Request, Uri, Version, header};
use libfuzzer_sys::fuzz_target;
use sidemesh_proxy::detect::{self, MAX_PREFIX};

/// A request from lines: method, URI, then `name: value` headers; the first
/// byte picks the version.
fn request(data: &[u8]) -> Option<Request<()>> {
    let (&v, rest) = data.split_first()?;
    let mut lines = rest.split(|&b| b == b'\n');
    let method = Method::from_bytes(lines.next()?).ok()?;
    let uri = Uri::try_from(lines.next()?).ok()?;
    let version = [Version::HTTP_09, Version::HTTP_10, Version::HTTP_11, Version::HTTP_2][usize::from(v % 4)];
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(version)
        .body(())
        .ok()?;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            req.headers_mut().append(n, v);
        }
    }
    Some(req)
}

fuzz_target!(|data: &[u8]| {
    let first = &data[..data.len().min(MAX_PREFIX)];
    if let Some((k, said)) = (0..=first.len()).find_map(|k| detect::classify_prefix(&first[..k]).map(|p| (k, p))) {
        for j in k..=first.len() {
            assert_eq!(
                detect::classify_prefix(&first[..j]),
                Some(said),
                "verdict changed at {j} bytes"
            );
        }
    }

    let Some(mut req) = request(data) else {
        return;
    };
    let _ = sidemesh_proxy::upgrade::requested(req.version(), req.headers());
    let version = req.version();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let host = req.uri().authority().map(|a| a.as_str().to_owned()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let mut plain = req.clone();
    let _ = sidemesh_proxy::http::to_plain(&mut plain, "10.0.0.9:8080");
    if sidemesh_proxy::http::to_mesh(&mut req, "10.0.0.1:80").is_err() {
        return;
    }
    assert_eq!(req.version(), Version::HTTP_2);
    assert!(req.headers().get(header::HOST).is_none());
    for h in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        assert!(req.headers().get(&h).is_none(), "{h} crossed to the mesh");
    }
    let back = sidemesh_proxy::http::to_app(&mut req, "127.0.0.1:8080").expect("a rewritten request goes to the app");
    let expected = match version {
        Version::HTTP_2 => Version::HTTP_2,
        Version::HTTP_10 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    assert_eq!((back, req.version()), (expected, expected));
    assert_eq!(req.uri().path_and_query().map_or("/", |p| p.as_str()), path);
    if expected != Version::HTTP_2
        && let Some(host) = host
    {
        assert_eq!(
            req.headers().get(header::HOST).and_then(|h| h.to_str().ok()),
            Some(host.as_str())
        );
    }
});
