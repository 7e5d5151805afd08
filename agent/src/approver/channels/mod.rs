//! Where people see requests: one trait, one folder per channel. A channel shows a new
//! request (`notify`) and updates what it showed once the request is decided or expired
//! (`update`); channels that take answers (Slack's buttons) also add HTTP routes of their own
//! in the server, and every answer goes through the same store call whatever its channel.
pub mod slack;
pub mod slack_socket;
pub mod teams;
pub mod webhook;

use std::{future::Future, pin::Pin};

use crate::approver::store::StoredRequest;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The HTTP call failed (unreachable, timeout, non-2xx).
    #[error("{channel}: {message}")]
    Http {
        channel: &'static str,
        message: String,
    },
    /// The service answered with an error of its own (e.g. Slack's `ok: false`).
    #[error("{channel}: the service answered {message}")]
    Api {
        channel: &'static str,
        message: String,
    },
}

/// One way of showing requests to people.
pub trait Channel: Send + Sync {
    /// Short name, also used in answers' `channel` field.
    fn name(&self) -> &'static str;
    /// Shows a new request; returns what identifies it for [`Channel::update`], if anything.
    fn notify<'a>(
        &'a self,
        req: &'a StoredRequest,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, ChannelError>>;
    /// Tells the people who saw the request something new about it (a reminder, the ladder
    /// reaching another group), next to what `notify` showed.
    fn nudge<'a>(
        &'a self,
        req: &'a StoredRequest,
        reference: &'a str,
        text: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>>;
    /// Updates what `notify` showed (decided or expired).
    fn update<'a>(
        &'a self,
        req: &'a StoredRequest,
        reference: &'a str,
        public_url: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ChannelError>>;
}

/// One-line summary of what a request asks, for notifications' plain text.
#[must_use]
pub fn summary(req: &StoredRequest) -> String {
    let e = &req.escalation;
    let v = &e.request;
    format!(
        "#{} {} on {}: label {} wants to {}",
        req.id,
        req.state,
        e.host_name,
        v.label,
        v.what()
    )
}
