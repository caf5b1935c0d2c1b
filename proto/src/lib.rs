//! Wire formats of sidemesh: generated gRPC code for the identity API and the
//! destination (discovery + traffic policy) API. No logic lives here.
#![forbid(unsafe_code)]

/// `sidemesh.identity.v1`: the certificate authority API.
pub mod identity {
    /// Version 1 of the identity API.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("sidemesh.identity.v1");
    }
}

/// `sidemesh.destination.v1`: discovery and traffic policy for proxies.
pub mod destination {
    /// Version 1 of the destination API.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("sidemesh.destination.v1");
    }
}
