//! virtio-blk against hand-built virtqueues in synthetic guest memory, including guests
//! that lie in their descriptors.
//!
//! Every submission checks what a guest relies on besides the status byte: the request
//! comes back in the used ring exactly once, and no buffer the guest gave the device to
//! read (a descriptor without `VRING_DESC_F_WRITE`) is written. Every refused request is
//! checked for its reason (`IOERR` or `UNSUPP`) and for leaving the disk untouched.

#[path = "blk/disks.rs"]
mod disks;
#[path = "blk/lying.rs"]
mod lying;
#[path = "blk/requests.rs"]
mod requests;
#[path = "blk/rig.rs"]
mod rig;
