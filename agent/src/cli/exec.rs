//! `countersign exec --label L -- CMD...`: labels itself through the daemon, then becomes CMD.
//! Fails closed: if the label cannot be applied, CMD is not run.
use std::{os::unix::process::CommandExt as _, path::Path, process::Command};

use crate::{cli::client, paths, proto::Request};

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
    if let Err(e) = client::call(
        socket_dir,
        paths::LAUNCH_SOCKET,
        &Request::Label {
            label: label.to_owned(),
        },
    ) {
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
