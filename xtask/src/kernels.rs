//! The test kernels: Debian's cloud kernels with BPF LSM, cached per machine under `~/.cache/countersign/kernels`.
//!
//! The host's own kernel refuses BPF LSM programs, so the LSM tests run under qemu on real
//! distribution kernels: Debian 12 "bookworm" (6.1) and Debian 13 "trixie" (6.12). Each is
//! fetched once with apt (signatures checked by the machine's Debian archive keyring) and
//! kept as `<cache>/kernels/<id>/vmlinuz` next to a `version` file.
//!
//! bookworm comes from the machine's own apt configuration (the machine is Debian 12).
//! trixie comes from a private apt configuration under `target/vm/apt-trixie` whose only
//! source is the machine's own Debian archive URI with the suite `trixie`: the machine's
//! apt state is never touched. The newest kernel the archive offers, unstable's (`sid`),
//! comes the same way. Each is fetched once per machine: a newer kernel in the archive is
//! taken only when the cache folder is removed.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::paths;
use crate::process::{run_captured, run_ok, tail};
use crate::setup::{APT_NETWORK_OPTIONS, apt_get_update_host, is_root};

/// The metapackage that depends on the current cloud kernel of a Debian release.
const CLOUD_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// One of the test kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum KernelId {
    /// Debian 12 "bookworm", Linux 6.1 cloud kernel.
    #[value(name = "debian12")]
    Debian12,
    /// Debian 13 "trixie", Linux 6.12 cloud kernel.
    #[value(name = "debian13")]
    Debian13,
    /// Debian "sid" (unstable): the newest cloud kernel the Debian archive offers.
    #[value(name = "debian-sid")]
    DebianSid,
}

impl KernelId {
    /// Every test kernel, oldest first (what setup fetches).
    pub const ALL: [KernelId; 3] = [KernelId::Debian12, KernelId::Debian13, KernelId::DebianSid];

    /// The id used on the command line and as the cache folder name.
    pub fn name(self) -> &'static str {
        match self {
            KernelId::Debian12 => "debian12",
            KernelId::Debian13 => "debian13",
            KernelId::DebianSid => "debian-sid",
        }
    }

    /// The Debian suite the kernel comes from.
    pub fn suite(self) -> &'static str {
        match self {
            KernelId::Debian12 => "bookworm",
            KernelId::Debian13 => "trixie",
            KernelId::DebianSid => "sid",
        }
    }

    /// The prefix of the kernel image package name, e.g. `linux-image-6.1.` (which also
    /// checks that the suite served the kernel series we expect).
    fn package_prefix(self) -> &'static str {
        match self {
            KernelId::Debian12 => "linux-image-6.1.",
            KernelId::Debian13 => "linux-image-6.12.",
            // Whatever series unstable carries.
            KernelId::DebianSid => "linux-image-",
        }
    }

    /// `<cache>/kernels/<id>`.
    pub fn cache_dir(self) -> PathBuf {
        paths::cache_dir().join("kernels").join(self.name())
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KernelId {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        KernelId::ALL
            .into_iter()
            .find(|id| id.name() == s)
            .with_context(|| {
                format!("unknown kernel id {s:?} (known: debian12, debian13, debian-sid)")
            })
    }
}

/// A cached kernel.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub id: KernelId,
    /// The bzImage to pass to qemu's `-kernel`.
    pub vmlinuz: PathBuf,
    /// What the `version` file says: kernel release and the Debian package it came from.
    pub version: String,
}

/// The cached kernel, if it has been fetched.
pub fn cached(id: KernelId) -> Option<Kernel> {
    let dir = id.cache_dir();
    let vmlinuz = dir.join("vmlinuz");
    // vmlinuz is written last (renamed into place), so its presence means a complete fetch.
    let version = fs::read_to_string(dir.join("version")).ok()?;
    vmlinuz.is_file().then(|| Kernel {
        id,
        vmlinuz,
        version: version.trim().to_owned(),
    })
}

/// The cached kernel, fetched first if needed (prints `installing: ...` when it fetches).
pub fn ensure_kernel(id: KernelId) -> Result<Kernel> {
    if let Some(kernel) = cached(id) {
        return Ok(kernel);
    }
    println!(
        "installing: kernel {id} (Debian {} cloud kernel)",
        id.suite()
    );
    fetch(id).with_context(|| {
        format!(
            "kernel {id}: fetching the Debian {} cloud kernel",
            id.suite()
        )
    })?;
    cached(id).with_context(|| format!("kernel {id}: fetched, but the cache is incomplete"))
}

/// How apt is run for one suite: extra `-o` options (none for the host's own suite).
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(APT_NETWORK_OPTIONS).args(&self.options);
        cmd
    }
}

/// Downloads, unpacks and caches the kernel `id`.
fn fetch(id: KernelId) -> Result<()> {
    let apt = match id {
        KernelId::Debian12 => host_apt(id)?,
        KernelId::Debian13 | KernelId::DebianSid => private_apt(id)?,
    };
    let package = resolve_kernel_package(&apt, id)?;

    let scratch =
        ScratchDir::new(paths::vm_dir().join(format!("download-{id}-{}", std::process::id())))?;
    let unpacked = scratch.0.join("unpacked");
    let (deb, image) = match download_and_unpack(&apt, id, &package, &scratch.0, &unpacked)? {
        (deb, Some(image)) => (deb, image),
        // From Debian 14 the image package depends on `linux-binary-<release>`, which holds
        // the kernel itself (under /usr/lib/modules/<release>/).
        (deb, None) => {
            let depends = run_ok(
                Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"),
                Duration::from_secs(60),
                &format!("kernel {id}: reading the dependencies of {}", deb.display()),
            )?;
            let binary = depends
                .split(',')
                .filter_map(|d| d.split_whitespace().next())
                .find(|d| d.starts_with("linux-binary-"))
                .with_context(|| {
                    format!("kernel {id}: {package} has no vmlinuz and depends on no linux-binary-* package")
                })?
                .to_owned();
            match download_and_unpack(&apt, id, &binary, &scratch.0, &unpacked)? {
                (_, Some(image)) => (deb, image),
                (_, None) => bail!("kernel {id}: neither {package} nor {binary} has a vmlinuz"),
            }
        }
    };
    let package_version = run_ok(
        Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"),
        Duration::from_secs(60),
        &format!("kernel {id}: reading the version of {}", deb.display()),
    )?;
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_owned)
        .or_else(|| {
            // /usr/lib/modules/<release>/vmlinuz
            image
                .parent()
                .and_then(Path::file_name)
                .and_then(|n| n.to_str())
                .map(str::to_owned)
        })
        .unwrap_or_default();

    let dir = id.cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("kernel {id}: creating {}", dir.display()))?;
    let version = format!(
        "{release} (Debian package {package} {})\n",
        package_version.trim()
    );
    fs::write(dir.join("version"), version)
        .with_context(|| format!("kernel {id}: writing {}", dir.join("version").display()))?;
    let partial = dir.join(format!("vmlinuz.partial-{}", std::process::id()));
    fs::copy(&image, &partial).with_context(|| {
        format!(
            "kernel {id}: copying {} to {}",
            image.display(),
            partial.display()
        )
    })?;
    fs::rename(&partial, dir.join("vmlinuz"))
        .with_context(|| format!("kernel {id}: moving {} into place", partial.display()))?;
    Ok(())
}

/// Downloads `package` into `scratch`, unpacks it into `unpacked`; the .deb and the kernel
/// image in it, if any (`boot/vmlinuz-*`, or `usr/lib/modules/*/vmlinuz`).
fn download_and_unpack(
    apt: &Apt,
    id: KernelId,
    package: &str,
    scratch: &Path,
    unpacked: &Path,
) -> Result<(PathBuf, Option<PathBuf>)> {
    // apt normally downloads as the unprivileged `_apt` user, which cannot write into the
    // work tree; downloading as the invoking user is what `apt-get download` does anyway
    // when it has to, minus the warning.
    run_ok(
        apt.command("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
            .current_dir(scratch),
        Duration::from_secs(30 * 60),
        &format!("kernel {id}: apt-get download {package}"),
    )?;
    let deb = find_file(scratch, |name| {
        name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
    })?
    .with_context(|| {
        format!(
            "kernel {id}: apt-get download {package} left no .deb in {}",
            scratch.display()
        )
    })?;
    run_ok(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(unpacked),
        Duration::from_secs(5 * 60),
        &format!("kernel {id}: unpacking {}", deb.display()),
    )?;
    let boot = unpacked.join("boot");
    if boot.is_dir()
        && let Some(image) = find_file(&boot, |name| name.starts_with("vmlinuz-"))?
    {
        return Ok((deb, Some(image)));
    }
    let modules = unpacked.join("usr/lib/modules");
    if modules.is_dir() {
        for release in fs::read_dir(&modules)
            .with_context(|| format!("reading {}", modules.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
        {
            if release.join("vmlinuz").is_file() {
                return Ok((deb, Some(release.join("vmlinuz"))));
            }
        }
    }
    Ok((deb, None))
}

/// The machine's own apt, for the machine's own suite.
fn host_apt(id: KernelId) -> Result<Apt> {
    let codename = host_codename()?;
    if codename != id.suite() {
        bail!(
            "this machine runs Debian {codename}, but kernel {id} is fetched through the machine's own apt, which needs {}",
            id.suite()
        );
    }
    Ok(Apt {
        options: Vec::new(),
    })
}

/// A private apt configuration under `target/vm/apt-<suite>` whose only source is the
/// machine's Debian archive with suite `id.suite()`; runs `apt-get update` with it.
fn private_apt(id: KernelId) -> Result<Apt> {
    let suite = id.suite();
    let source = host_archive_source()?;
    let root = paths::vm_dir().join(format!("apt-{suite}"));
    let state = root.join("state");
    let cache = root.join("cache");
    for dir in [state.join("lists/partial"), cache.join("archives/partial")] {
        fs::create_dir_all(&dir)
            .with_context(|| format!("kernel {id}: creating {}", dir.display()))?;
    }
    let sources = root.join("sources.list");
    let options = match &source.signed_by {
        Some(keyring) => format!(" [signed-by={keyring}]"),
        None => String::new(),
    };
    fs::write(
        &sources,
        format!(
            "# Written by xtask (kernels.rs): the machine's Debian archive, suite {suite}.\n\
             deb{options} {} {suite} main\n",
            source.uri
        ),
    )
    .with_context(|| format!("kernel {id}: writing {}", sources.display()))?;

    let apt = Apt {
        options: vec![
            "-o".into(),
            format!("Dir::State={}", state.display()),
            "-o".into(),
            format!("Dir::Cache={}", cache.display()),
            "-o".into(),
            format!("Dir::Etc::SourceList={}", sources.display()),
            "-o".into(),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "-o".into(),
            "Acquire::Languages=none".into(),
        ],
    };
    let out = run_captured(
        apt.command("apt-get").args(["-q", "update"]),
        Duration::from_secs(15 * 60),
        &format!("kernel {id}: apt-get update ({suite})"),
    )?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if [
        "NO_PUBKEY",
        "GPG error",
        "is not signed",
        "EXPKEYSIG",
        "BADSIG",
    ]
    .iter()
    .any(|needle| text.contains(needle))
    {
        bail!(
            "kernel {id}: the signature of the Debian {suite} archive could not be verified with {} \
             (install a debian-archive-keyring that knows {suite}); apt said:\n{}",
            source
                .signed_by
                .as_deref()
                .unwrap_or("the machine's trusted keys"),
            tail(&text, 20)
        );
    }
    if !out.status.success() || text.contains("\nE: ") || text.contains("\nW: Failed to fetch") {
        bail!(
            "kernel {id}: apt-get update for {suite} from {} failed ({}):\n{}",
            source.uri,
            out.status,
            tail(&text, 20)
        );
    }
    Ok(apt)
}

/// Finds the real kernel package behind the cloud metapackage of `id`'s suite.
fn resolve_kernel_package(apt: &Apt, id: KernelId) -> Result<String> {
    let depends = || -> Result<Option<String>> {
        let out = run_captured(
            apt.command("apt-cache")
                .args(["depends", CLOUD_METAPACKAGE]),
            Duration::from_secs(120),
            &format!("kernel {id}: apt-cache depends {CLOUD_METAPACKAGE}"),
        )?;
        Ok(pick_kernel_package(
            &String::from_utf8_lossy(&out.stdout),
            id.package_prefix(),
        ))
    };
    if let Some(package) = depends()? {
        return Ok(package);
    }
    // The machine's package lists may be missing or old: refresh them once (needs root).
    if apt.options.is_empty() {
        if !is_root() {
            bail!(
                "kernel {id}: apt knows no {CLOUD_METAPACKAGE} depending on {}*: run `sudo apt-get update`",
                id.package_prefix()
            );
        }
        apt_get_update_host()?;
        if let Some(package) = depends()? {
            return Ok(package);
        }
    }
    bail!(
        "kernel {id}: {CLOUD_METAPACKAGE} in Debian {} depends on no {}*-cloud-amd64 package",
        id.suite(),
        id.package_prefix()
    )
}

/// From `apt-cache depends` output, the first dependency named `<prefix>*-cloud-amd64`
/// (or its `-unsigned` variant), e.g. `linux-image-6.1.0-37-cloud-amd64`.
fn pick_kernel_package(depends_output: &str, prefix: &str) -> Option<String> {
    depends_output.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let name = line.strip_prefix("Depends:")?.trim();
        // apt-cache shows virtual packages as <name>.
        let name = name.trim_start_matches('<').trim_end_matches('>');
        let real = name.starts_with(prefix)
            && (name.ends_with("-cloud-amd64") || name.ends_with("-cloud-amd64-unsigned"));
        real.then(|| name.to_owned())
    })
}

/// `VERSION_CODENAME` from /etc/os-release.
fn host_codename() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .context("/etc/os-release has no VERSION_CODENAME (is this Debian?)")
}

/// One `deb` source of the machine's apt configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AptSource {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
    /// A keyring file named by `Signed-By`/`signed-by=`, when it is a file.
    signed_by: Option<String>,
}

/// The URI (and keyring) of the machine's Debian archive: the first `deb` source serving the
/// machine's own suite (e.g. `bookworm`, not `bookworm-security`) with `main`.
fn host_archive_source() -> Result<AptSource> {
    let codename = host_codename()?;
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "list" || ext == "sources")
            })
            .collect();
        parts.sort();
        files.extend(parts);
    }
    let mut sources = Vec::new();
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        if file.extension().is_some_and(|ext| ext == "sources") {
            sources.extend(parse_deb822(&text));
        } else {
            sources.extend(parse_one_line(&text));
        }
    }
    let serves_main = |s: &&AptSource| s.components.iter().any(|c| c == "main");
    sources
        .iter()
        .filter(serves_main)
        .find(|s| s.suites.contains(&codename))
        .cloned()
        .with_context(|| {
            format!(
                "no `deb` source for suite {codename} with component main in {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Keeps a `signed-by` value only when it names a keyring file that exists.
fn keyring_file(value: &str) -> Option<String> {
    let first = value.split([',', ' ']).find(|s| !s.is_empty())?;
    (first.starts_with('/') && Path::new(first).is_file()).then(|| first.to_owned())
}

/// Parses one-line sources (`deb [opts] URI SUITE COMPONENT...`).
fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            for opt in opts.split_whitespace() {
                if let Some(value) = opt.strip_prefix("signed-by=") {
                    signed_by = keyring_file(value);
                }
            }
            rest = after.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(AptSource {
            uri: uri.to_owned(),
            suites: vec![suite.to_owned()],
            components: words.map(str::to_owned).collect(),
            signed_by,
        });
    }
    out
}

/// Parses deb822 sources (`Types:`, `URIs:`, `Suites:`, `Components:`, `Signed-By:`
/// stanzas separated by blank lines; continuation lines start with white space).
fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = fields.last_mut() {
                    value.push('\n');
                    value.push_str(line.trim());
                }
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                fields.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let words = |key: &str| -> Vec<String> {
            get(key)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        if !words("types").iter().any(|t| t == "deb") {
            continue;
        }
        let signed_by = get("signed-by").and_then(keyring_file);
        for uri in words("uris") {
            out.push(AptSource {
                uri,
                suites: words("suites"),
                components: words("components"),
                signed_by: signed_by.clone(),
            });
        }
    }
    out
}

/// The first file in `dir` whose name satisfies `pred`.
fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// A scratch folder, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(path: PathBuf) -> Result<Self> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_real_kernel_package() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            pick_kernel_package(out, "linux-image-6.1."),
            Some("linux-image-6.1.0-56-cloud-amd64".into())
        );
        let out =
            "linux-image-cloud-amd64\n |Depends: linux-image-6.12.38+deb13-cloud-amd64-unsigned\n";
        assert_eq!(
            pick_kernel_package(out, "linux-image-6.12."),
            Some("linux-image-6.12.38+deb13-cloud-amd64-unsigned".into())
        );
        assert_eq!(pick_kernel_package(out, "linux-image-6.1."), None);
    }

    #[test]
    fn parses_both_source_formats() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://archive.example.invalid/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://archive.example.invalid/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        let parsed = parse_deb822(deb822);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].uri, "http://archive.example.invalid/debian");
        assert_eq!(parsed[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(parsed[1].suites, ["bookworm-security"]);

        let one_line = "# comment\ndeb-src http://one.example.invalid/debian bookworm main\n\
                        deb [arch=amd64] http://two.example.invalid/debian bookworm main contrib\n";
        let parsed = parse_one_line(one_line);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].uri, "http://two.example.invalid/debian");
        assert_eq!(parsed[0].components, ["main", "contrib"]);
    }
}
