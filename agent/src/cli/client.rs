//! A blocking client for the daemon's local sockets.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    paths,
    proto::{Request, Response},
};

/// How long the daemon may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request to `socket` in `dir` and returns the daemon's answer. A
/// [`Response::Error`] becomes an error carrying the daemon's message.
pub fn call(dir: &Path, socket: &str, request: &Request) -> anyhow::Result<Response> {
    let (stream, path) = connect(dir, socket)?;
    call_on(stream, &path, request)
}

/// A connection to `socket` in `dir`, for one request ([`call_on`]).
pub fn connect(dir: &Path, socket: &str) -> anyhow::Result<(UnixStream, PathBuf)> {
    let path: PathBuf = dir.join(socket);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!(
                "{}: permission denied (listing and deciding requests needs root)",
                path.display()
            );
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot reach the countersign daemon at {} (is it running? `countersign daemon`)", path.display())
            });
        }
    };
    Ok((stream, path))
}

/// Sends one request on a connection made by [`connect`] (to `path`) and returns the answer.
pub fn call_on(mut stream: UnixStream, path: &Path, request: &Request) -> anyhow::Result<Response> {
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .with_context(|| format!("sending to {}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    let response: Response = serde_json::from_str(answer.trim())
        .with_context(|| format!("malformed answer from {}: {answer:?}", path.display()))?;
    if let Response::Error { message } = response {
        bail!("{message}");
    }
    Ok(response)
}

/// Status is served on both sockets: root uses the control socket, others the launch one.
pub fn status_socket() -> &'static str {
    if nix::unistd::geteuid().is_root() {
        paths::CONTROL_SOCKET
    } else {
        paths::LAUNCH_SOCKET
    }
}
