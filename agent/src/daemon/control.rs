//! The local sockets: `control.sock` (root only: list, decide, status) and `launch.sock`
//! (anyone: label yourself, status). Each connection sends one request line and gets one
//! response line; the daemon's main loop answers (see [`Command`]).
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    paths,
    proto::{MAX_REQUEST_BYTES, Request, Response},
};

/// Most connections served at once, per socket.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Which socket a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    Control,
    Launch,
}

/// The caller, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub socket: Socket,
}

/// A request for the main loop.
pub struct Command {
    pub request: Request,
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: another countersign daemon is already running here")]
    InUse(PathBuf),
}

/// Takes the daemon lock in `dir` (created if needed): one daemon per socket directory. The
/// lock is held for as long as the returned file lives.
pub fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ControlError> {
    std::fs::create_dir_all(dir).map_err(|source| ControlError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(paths::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| ControlError::InUse(path))
}

/// Binds both sockets in `dir` and serves them until the returned tasks are dropped.
pub fn serve(dir: &Path, tx: mpsc::Sender<Command>) -> Result<(), ControlError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, socket, mode) in [
        (paths::CONTROL_SOCKET, Socket::Control, 0o600),
        (paths::LAUNCH_SOCKET, Socket::Launch, 0o666),
    ] {
        let path = dir.join(name);
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse(path));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(io(&path))?;
        tokio::spawn(accept_loop(listener, socket, tx.clone()));
    }
    Ok(())
}

async fn accept_loop(listener: UnixListener, socket: Socket, tx: mpsc::Sender<Command>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Bounded: a flood of connections cannot exhaust the daemon.
                    let busy = Response::Error {
                        message: format!("busy: more than {MAX_CONNECTIONS} open connections"),
                    };
                    let mut line = serde_json::to_vec(&busy).unwrap_or_default();
                    line.push(b'\n');
                    let _ = stream.try_write(&line);
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    handle(stream, socket, tx).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a control connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: UnixStream, socket: Socket, tx: mpsc::Sender<Command>) {
    let response = match request(&mut stream, socket).await {
        Ok((request, peer)) => {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(Command {
                    request,
                    peer,
                    reply,
                })
                .await
                .is_err()
            {
                Response::Error {
                    message: "the daemon is shutting down".into(),
                }
            } else {
                rx.await.unwrap_or(Response::Error {
                    message: "the daemon is shutting down".into(),
                })
            }
        }
        Err(message) => Response::Error { message },
    };
    let mut line = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
}

async fn request(stream: &mut UnixStream, socket: Socket) -> Result<(Request, Peer), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("reading the caller's credentials: {e}"))?;
    let pid = cred
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or("the caller has no pid")?;
    let peer = Peer {
        pid,
        uid: cred.uid(),
        socket,
    };
    let mut line = String::new();
    let mut reader = BufReader::new(&mut *stream).take(MAX_REQUEST_BYTES as u64 + 1);
    match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Err(format!("no request within {READ_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    let request =
        serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))?;
    Ok((request, peer))
}
