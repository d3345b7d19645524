//! Test fixtures shared by the integration tests and the demo example.
//!
//! Nothing in here is part of the shipped binary.
// Compiled into several test binaries, each using a different subset; fixture
// setup may unwrap (a broken fixture should fail the test loudly).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod curl;
pub mod envoy;
pub mod inproc;
pub mod jwt;
pub mod processor;
pub mod upstream;
