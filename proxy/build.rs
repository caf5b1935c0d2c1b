//! Link option for the proxy binary, which runs once per Pod: its resident
//! memory is mostly its own text and the tables the loader reads at start
//! (docs/performance.md#memory).
//!
//! - `-z pack-relative-relocs` (RELR): a position-independent binary carries a
//!   relocation per pointer in its read-only data, ~380 KB that the loader
//!   reads at start and so keeps resident; RELR packs them into a few KB and
//!   keeps ASLR. Needs glibc ≥ 2.36 at run time (the image is bookworm).
//!
//! (`--icf=all` was tried too: 41 KB, not worth a second linker option.)

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
