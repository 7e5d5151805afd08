//! `countersign exec --label L -- CMD...`: labels itself through the daemon, then becomes CMD.
//! Fails closed: if the label cannot be applied, CMD is not run.
//!
//! In fallback mode the daemon also asks for the launcher's exec notifier: a seccomp filter
//! that makes every exec of CMD and of what it starts wait for the daemon before it begins
//! (see `daemon::notify`). If it cannot be installed and handed over, CMD is not run either.
use std::{
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::Command,
};

use crate::{
    cli::client,
    daemon::notify,
    paths,
    proto::{Request, Response},
};

/// Exit status when labelling fails (CMD never ran).
pub const EXIT_NOT_LABELLED: i32 = 125;
/// Exit status when CMD cannot be executed.
pub const EXIT_CANNOT_EXEC: i32 = 127;

pub fn run(socket_dir: &Path, label: &str, command: &[String]) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!(
            "countersign exec: no command given (usage: countersign exec --label L -- CMD [ARGS...])"
        );
        return EXIT_NOT_LABELLED;
    };
    let notify_execs = match client::call(
        socket_dir,
        paths::LAUNCH_SOCKET,
        &Request::Label {
            label: label.to_owned(),
        },
    ) {
        Ok(Response::Labelled { notify_execs, .. }) => notify_execs,
        Ok(other) => {
            eprintln!("countersign exec: not running {program}: unexpected answer {other:?}");
            return EXIT_NOT_LABELLED;
        }
        Err(e) => {
            eprintln!("countersign exec: not running {program}: {e:#}");
            return EXIT_NOT_LABELLED;
        }
    };
    if notify_execs && let Err(e) = hand_over_notifier(socket_dir) {
        eprintln!("countersign exec: not running {program}: {e:#}");
        return EXIT_NOT_LABELLED;
    }
    let err = Command::new(program).args(args).exec();
    eprintln!("countersign exec: {program}: {err}");
    if err.raw_os_error() == Some(libc::EPERM) {
        126
    } else {
        EXIT_CANNOT_EXEC
    }
}

/// Installs the exec filter on this (single-threaded) process and hands its listener to the
/// daemon, which takes it from this process while the call is answered; this process's copy
/// is closed before CMD starts. The connection to the daemon is made first: under the filter
/// a connect to a local socket waits for the daemon, which does not have the listener yet.
fn hand_over_notifier(socket_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (stream, path) = client::connect(socket_dir, paths::LAUNCH_SOCKET)?;
    let listener = notify::install_filter().context("installing the exec notifier")?;
    let answer = client::call_on(
        stream,
        &path,
        &Request::ExecNotifier {
            fd: listener.as_raw_fd(),
        },
    )
    .context("handing the exec notifier to the daemon")?;
    drop(listener);
    match answer {
        Response::NotifierTaken { .. } => Ok(()),
        other => {
            anyhow::bail!("handing the exec notifier to the daemon: unexpected answer {other:?}")
        }
    }
}
