//! Signed decision records, end to end: what the daemon spools verifies, a removed record
//! is found, and a spool that cannot be written refuses rather than releases.
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use countersign_tests::{Daemon, WAIT, countersign_bin};

use super::{marker, probe};

/// `countersign records verify PATH --key KEY`.
fn verify(path: &Path, key: &Path) -> Output {
    std::process::Command::new(countersign_bin())
        .args(["records", "verify"])
        .arg(path)
        .arg("--key")
        .arg(key)
        .output()
        .expect("running countersign records verify")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The spool's only segment.
fn segment(spool: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(spool)
        .expect("spool dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "one segment: {segs:?}");
    segs.remove(0)
}

/// Byte ranges of the frames of a segment (`CSR1`, u32 LE length, 32-byte checksum, payload).
fn frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 40 <= bytes.len() {
        assert_eq!(&bytes[at..at + 4], b"CSR1", "frame at {at}");
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push(at..at + 40 + len);
        at += 40 + len;
    }
    assert_eq!(at, bytes.len(), "whole frames only");
    out
}

/// The summary line `N/M records valid, …` of a verify run.
fn summary(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn decisions_are_signed_records_that_verify_and_a_removed_one_is_named() {
    let mut d = Daemon::start();
    let m = marker(&d, "ran");
    let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
    let r = d.wait_exec(p.pid(), "touch");
    d.decide(&r, "approve");
    assert!(p.wait(WAIT).success());
    let m2 = marker(&d, "ran2");
    let mut q = d.labelled("coder", &[&probe(), "touch", &m2]);
    let r2 = d.wait_exec(q.pid(), "touch");
    d.decide(&r2, "kill");
    q.wait(WAIT);
    assert_eq!(
        d.status()["records_written"].as_u64().map(|n| n >= 5),
        Some(true)
    );
    d.stop();

    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
    // daemon-start, request + approved, request + killed, daemon-stop, and in LSM mode the
    // exec-verified outcome.
    let n = frames(&std::fs::read(segment(&d.spool_dir())).unwrap()).len();
    assert!(n >= 6, "{n} records");
    assert_eq!(
        summary(&out),
        format!("{n}/{n} records valid, 0 gaps, 0 forks, 0 self-approvals")
    );

    // The signed record of the approval holds the request as shown to the human.
    let seg = segment(&d.spool_dir());
    let bytes = std::fs::read(&seg).unwrap();
    let fr = frames(&bytes);

    // Remove the third record: the fourth is named, and the exit status says it.
    let mut cut = bytes[..fr[2].start].to_vec();
    cut.extend_from_slice(&bytes[fr[2].end..]);
    std::fs::write(&seg, &cut).unwrap();
    let out = verify(&d.spool_dir(), &d.host_pub());
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("seq 4: gap: seq 3 to 3 missing"), "{t}");
    assert_eq!(
        summary(&out),
        format!(
            "{}/{} records valid, 1 gaps, 0 forks, 0 self-approvals",
            n - 2,
            n - 1
        )
    );

    // Verified with another key: every record is refused.
    let other = d.dir().join("other.pub");
    std::fs::write(
        &other,
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let out = verify(&d.spool_dir(), &other);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no trusted host key has that id"),
        "{}",
        text(&out)
    );
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn new(path: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: valid NUL-terminated strings; mounting a fresh tmpfs on our own directory.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Self { path }
    }

    /// Fills the filesystem with `filler`.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|()| f.sync_data()).is_ok() {}
    }

    fn unfill(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: unmounting the tmpfs this test mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_spool_that_cannot_be_written_refuses_and_releases_nothing() {
    let base = tempfile::tempdir().unwrap();
    let fs = SmallFs::new(base.path().join("spool"), "256k");
    let spool = fs.path.to_str().unwrap().to_owned();
    let mut d = Daemon::start_with(&["--request-timeout", "60", "--spool-dir", &spool]);
    fs.fill();
    // The spool's last page still has room for a record or two: approve until a decision
    // cannot be recorded.
    let mut found = None;
    for i in 0..20 {
        let m = marker(&d, &format!("ran{i}"));
        let mut p = d.labelled("coder", &[&probe(), "touch", &m]);
        let r = d.wait_exec(p.pid(), "touch");
        let answer = d.decide(&r, "approve");
        if answer.contains("not applied") {
            found = Some((p, r, m));
            break;
        }
        assert!(p.wait(WAIT).success(), "{answer}");
    }
    let (mut p, r, m) = found.expect("the full spool was noticed");
    let status = d.status();
    assert!(
        status["records_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{status}"
    );
    assert!(
        p.still_running_after(Duration::from_millis(300)),
        "an approval that cannot be recorded is not applied"
    );
    assert!(!Path::new(&m).exists(), "nothing ran without a record");
    // Space again: the approval is recorded and applied.
    fs.unfill();
    let answer = d.decide(&r, "approve");
    assert!(answer.contains("approved"), "{answer}");
    assert!(p.wait(WAIT).success());
    assert!(Path::new(&m).exists());
    assert!(d.status()["records_error"].is_null());
    d.stop();
    // The failed writes left no damage behind.
    let out = verify(&fs.path, &d.host_pub());
    assert!(out.status.success(), "{}", text(&out));
}
