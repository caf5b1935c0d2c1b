//! Moving HTTP requests between an application's HTTP/1 or HTTP/2 and the
//! HTTP/2 the proxies speak to each other, and the proxy's own responses.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Tells the inbound proxy which HTTP version the client spoke, so HTTP/1 is
/// restored towards the application.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("sidemesh-orig-proto");
/// The client's SPIFFE ID, set by the inbound proxy on requests from mesh
/// peers (and removed from anything else, so it cannot be forged).
pub const CLIENT_ID: HeaderName = HeaderName::from_static("sidemesh-client-id");

/// The route attributes of a request (`<service> <route> <backend>`, `-`
/// for none), sent by the client proxy over the mesh hop so that the server
/// proxy's metrics carry them too; removed before the application sees the
/// request, and from anything an application sends (it is metadata between
/// proxies, like Istio's peer metadata).
pub const ROUTE_LABELS: HeaderName = HeaderName::from_static("sidemesh-route");

/// Body of requests and responses: streamed from the peer, held whole (a
/// response the proxy made, or a request buffered so it can be retried), or
/// streamed and copied for a retry ([`crate::replay`]).
pub type Body = Either<Incoming, Either<Full<Bytes>, crate::replay::Recording>>;

/// A body held whole.
pub fn full(bytes: Bytes) -> Body {
    Either::Right(Either::Left(Full::new(bytes)))
}

/// Retried attempts carry their number (1 for the first retry) so backends can tell.
pub const RETRY_ATTEMPT: HeaderName = HeaderName::from_static("x-sidemesh-retry-attempt");

/// A response made by the proxy itself.
pub fn respond(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut rsp = Response::new(full(Bytes::from_static(msg.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    rsp
}

/// Connection-specific headers, which HTTP/2 forbids and which never cross a proxy.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

/// Rewrites an application's request for the HTTP/2 hop between proxies:
/// absolute URI (authority from `Host`), hop-by-hop headers gone, and the
/// original version recorded.
pub fn to_mesh<B>(req: &mut Request<B>, fallback_authority: &str) -> Result<(), http::Error> {
    let orig = req.version();
    if orig != Version::HTTP_2 {
        let proto = if orig == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        req.headers_mut().insert(ORIG_PROTO, HeaderValue::from_static(proto));
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| fallback_authority.to_owned());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()?;
    req.headers_mut().remove(header::HOST);
    strip_hop_by_hop(req.headers_mut());
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// Rewrites a request that arrived from a peer proxy for the application at
/// `app` (`ip:port`): back to HTTP/1 when the client spoke it, `Host` restored.
pub fn to_app<B>(req: &mut Request<B>, app: &str) -> Result<Version, http::Error> {
    let version = match req.headers_mut().remove(ORIG_PROTO) {
        Some(v) if v == "HTTP/1.0" => Version::HTTP_10,
        Some(_) => Version::HTTP_11,
        None => Version::HTTP_2,
    };
    if version != Version::HTTP_2
        && !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(app)
        .path_and_query(path)
        .build()?;
    *req.version_mut() = version;
    Ok(version)
}

/// Rewrites an application's request for a plain (unmeshed) upstream at `addr`.
pub fn to_plain<B>(req: &mut Request<B>, addr: &str) -> Result<(), http::Error> {
    if req.version() != Version::HTTP_2
        && !req.headers().contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(addr)
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(addr)
        .path_and_query(path)
        .build()?;
    Ok(())
}
