//! The sidemesh certificate authority. It checks a workload's PKCS#10 request
//! and ServiceAccount token, and signs a short-lived SPIFFE leaf with the
//! issuer it holds; issuer and trust bundle are files re-read when they change.
//!
//! - [`ca`]: making roots and issuers;
//! - [`csr`]: parsing and verifying requests;
//! - [`token`]: TokenReview and file token reviewers;
//! - [`issuer`]: loading, checking and signing with the issuing CA;
//! - [`service`]: the gRPC API (`Certify`, `WatchIssuer`);
//! - [`server`]: TLS, serving certificate, reloads;
//! - [`metrics`](crate::metrics): instruments.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ca;
pub mod cli;
pub mod csr;
pub mod issuer;
pub mod metrics;
pub mod server;
pub mod service;
pub mod token;
