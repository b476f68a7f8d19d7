//! What vmsnap's tests, benchmarks and examples share, kept out of the product crate: the test
//! rig's machines ([`rig`]), the protocol fixture recorder and replayer ([`fixtures`]), and small
//! helpers every test lane repeated ([`support`]). It depends on vmsnap with the
//! `fault-injection` feature, so test builds of the binary carry the `VMSNAP_ABORT_AT` points and
//! release builds do not.

pub mod fixtures;
pub mod rig;
pub mod support;
