//! libvirt's side: the `qemu` hook that registers domains with the daemon as they start and
//! stop ([`hook`]), and enrolment, which gives a libvirt domain the QMP and agent sockets vmsnap
//! talks to ([`enroll`]).

pub mod enroll;
pub mod hook;
pub mod virsh;
