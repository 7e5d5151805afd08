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
const MAX_CONNECTIONS: usize = 256;
/// Most connections one user other than root may hold on the launch socket (anyone may
/// connect to it): a user who opens connections and sends nothing cannot make
/// `countersign exec` fail for the others.
const MAX_PER_USER: usize = 16;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read its answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Connections held per user on one socket.
#[derive(Default)]
struct Users(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// One user's connection, counted while it lives.
struct UserSlot {
    users: std::sync::Arc<Users>,
    uid: u32,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = self.users.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

impl Users {
    /// A slot for `uid`, unless it holds `MAX_PER_USER` already (root is not limited).
    fn admit(self: &std::sync::Arc<Self>, uid: u32) -> Option<UserSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(uid).or_insert(0);
        if uid != 0 && *n >= MAX_PER_USER {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            users: self.clone(),
            uid,
        })
    }
}

/// Answers `message` as an error without waiting for the client, and closes.
fn refuse(stream: &UnixStream, message: String) {
    let mut line = serde_json::to_vec(&Response::Error { message }).unwrap_or_default();
    line.push(b'\n');
    let _ = stream.try_write(&line);
}

async fn accept_loop(listener: UnixListener, socket: Socket, tx: mpsc::Sender<Command>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let users = std::sync::Arc::new(Users::default());
    // Refusals are logged once per ten seconds at most, with how many there were.
    let (mut refused, mut logged_at) = (0u64, None::<std::time::Instant>);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
                let Some(user) = users.admit(uid) else {
                    refused += 1;
                    if logged_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(
                            uid,
                            refused,
                            "a user holds {MAX_PER_USER} connections to the launch socket; refused more"
                        );
                        (refused, logged_at) = (0, Some(std::time::Instant::now()));
                    }
                    refuse(
                        &stream,
                        format!("busy: uid {uid} has {MAX_PER_USER} open connections"),
                    );
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Bounded: a flood of connections cannot exhaust the daemon.
                    refuse(
                        &stream,
                        format!("busy: more than {MAX_CONNECTIONS} open connections"),
                    );
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    handle(stream, socket, tx).await;
                    drop((slot, user));
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
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&line)).await;
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
