//! countersign's developer tasks, as a library so the tasks can call one another (the test
//! task boots VMs, every task runs setup first). `src/main.rs` is only the command line.
//!
//! - [`setup`]: toolchain, bpf-linker, Debian packages, test kernels (idempotent).
//! - [`kernels`]: the cached Debian kernels with BPF LSM.
//! - [`vm`]: runs one command in a qemu guest booted on one of those kernels.
//! - [`test`]: the project's checks and tests.

pub mod bench;
pub mod cpio;
pub mod kernels;
pub mod paths;
pub mod process;
pub mod setup;
pub mod test;
pub mod vm;
