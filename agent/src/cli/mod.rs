//! The client subcommands: `status`, `exec`, `requests`. They talk to the local daemon.
pub mod client;
pub mod exec;
pub mod off;
pub mod policy;
pub mod records;
pub mod remote;
pub mod requests;
pub mod status;
pub mod token;
