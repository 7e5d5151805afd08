//! `countersign`: one binary for the host daemon and the tools around it.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod approver;
mod cli;
mod collector;
mod daemon;
mod ebpf;
mod paths;
mod policy;
mod proto;
mod records;
mod serve;
mod sign;

use daemon::config::{DaemonConfig, TimeoutAction};
use proto::Decision;

#[derive(Parser)]
#[command(
    name = "countersign",
    version,
    about = "Hold an AI agent's privileged actions until a human countersigns them"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the host daemon (root): load the hooks and hold labelled processes' execs and connects.
    Daemon(DaemonArgs),
    /// Show the daemon's enforcement mode, why, and its counters.
    Status {
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn enforcement off when no daemon runs (root): what a daemon stopped with
    /// `on_stop: keep` (the default) or killed left in the kernel is removed; a process still
    /// waiting for a decision is killed, never let go.
    Off {
        /// Configuration file (default /etc/countersign/daemon.yaml if it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
    },
    /// Run CMD labelled as an agent: its execs and connects (and its children's) are held.
    Exec {
        /// The label (letters, digits, - _ .).
        #[arg(long)]
        label: String,
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// List and decide held requests (root).
    Requests {
        #[command(subcommand)]
        action: RequestsCmd,
        #[arg(long, global = true)]
        socket_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Grants in force (on this host, or at a remote approver), and taking them back.
    Grants {
        #[command(subcommand)]
        action: GrantsCmd,
        #[arg(long, global = true)]
        socket_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Check policy files, or see what they decide for an action.
    Policy {
        #[command(subcommand)]
        action: PolicyCmd,
    },
    /// The approval service daemons escalate to (Slack, webhook, REST API).
    Approver {
        #[command(subcommand)]
        action: Option<ApproverCmd>,
        /// Configuration file.
        #[arg(long, default_value = approver::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run the record collector: receives, verifies and stores the hosts' signed records.
    Collector {
        /// Configuration file (default /etc/countersign/collector.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Verify signed decision records (a spool or an evidence bundle), offline; export
    /// evidence bundles from the collector.
    Records {
        #[command(subcommand)]
        action: RecordsCmd,
    },
    #[command(name = "internal-canary", hide = true)]
    InternalCanary { port: u16 },
    #[command(name = "internal-canary-exec", hide = true)]
    InternalCanaryExec,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Configuration file (default /etc/countersign/daemon.yaml if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Where maps and links are pinned (on bpffs).
    #[arg(long)]
    bpf_pin_dir: Option<PathBuf>,
    #[arg(long)]
    decision_log: Option<PathBuf>,
    /// The remote approver's URL (replaces approver.url in the configuration).
    #[arg(long)]
    approver: Option<String>,
    /// A file with the one-time token to enroll with the approver.
    #[arg(long)]
    enroll_token_file: Option<PathBuf>,
    /// The host's signing key (made if missing).
    #[arg(long)]
    host_key: Option<PathBuf>,
    /// Where signed decision records are spooled.
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// Policy file or directory (repeatable; replaces the configured ones).
    #[arg(long)]
    policy: Vec<PathBuf>,
    #[arg(long, value_enum)]
    mode: Option<ebpf::ModeRequest>,
    /// Seconds a request waits for a decision.
    #[arg(long)]
    request_timeout: Option<u64>,
    /// What a request nobody decides gets.
    #[arg(long, value_enum)]
    timeout_action: Option<TimeoutAction>,
    /// Fallback mode: how launched agents' execs are held (see the configuration file).
    #[arg(long, value_enum)]
    fallback_exec_hold: Option<daemon::config::FallbackExecHold>,
    /// What a labelled task's attempt on countersign itself gets besides a refusal.
    #[arg(long, value_enum)]
    on_tamper: Option<daemon::config::OnTamper>,
    /// What a stop leaves in the kernel: keep (labelled processes stay held; default) or off.
    #[arg(long, value_enum)]
    on_stop: Option<daemon::config::OnStop>,
    /// Held requests at once; past it new ones are refused, recorded and counted.
    #[arg(long)]
    max_held_requests: Option<usize>,
}

/// How to reach a remote approver (instead of this host's daemon).
#[derive(clap::Args)]
struct RemoteArgs {
    /// A remote approver's URL: work there instead of on this host
    /// (also $COUNTERSIGN_APPROVER_URL).
    #[arg(
        long,
        global = true,
        env = "COUNTERSIGN_APPROVER_URL",
        conflicts_with = "socket_dir"
    )]
    approver: Option<String>,
    /// A file holding your approver token (also $COUNTERSIGN_APPROVER_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for the approver's TLS.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
}

impl RemoteArgs {
    /// The remote approver, if one was named.
    fn remote(self) -> Option<cli::remote::Remote> {
        Some(cli::remote::Remote {
            url: self.approver?,
            token_file: self.token_file,
            ca_file: self.ca_file,
        })
    }
}

#[derive(Subcommand)]
enum GrantsCmd {
    /// The grants in force.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Take a grant back: what it covered needs a human again.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum ApproverCmd {
    /// Print the SHA-256 of a token read from standard input (for approver.yaml's `tokens`
    /// and `enrollment_tokens`), or of a new random token printed with it.
    HashToken {
        /// Make a new random token instead of reading one.
        #[arg(long)]
        new: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Report every error with file, line and column; the exit status says valid or not.
    Check {
        /// Policy files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also list the existing cgroups of this host that `match: cgroup`/`systemd_unit`
        /// name (what the daemon labels now).
        #[arg(long)]
        cgroups: bool,
    },
    /// Print which rule matches an action and what would happen.
    #[command(group(clap::ArgGroup::new("action").required(true)))]
    Test {
        /// Policy files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        label: String,
        /// A command line, e.g. '/usr/bin/curl https://example.com'.
        #[arg(long, group = "action")]
        exec: Option<String>,
        /// HOST:PORT, e.g. 10.1.2.3:443 or api.example.com:443.
        #[arg(long, group = "action")]
        connect: Option<String>,
        /// HOST:PORT a datagram is sent to without a connect (`sendto`); connect rules
        /// decide it. The protocol defaults to udp.
        #[arg(long, group = "action")]
        send: Option<String>,
        /// A socket that is not ordinary TCP/UDP/local: FAMILY/TYPE, e.g. packet/raw,
        /// inet/raw, inet6/dgram (an ICMP socket), vsock/stream.
        #[arg(long, group = "action")]
        socket: Option<String>,
        /// A local socket: a path (/run/docker.sock) or @abstract name.
        #[arg(long, group = "action")]
        unix: Option<String>,
        /// ADDR:PORT a TCP socket listens on for connections from the network, e.g.
        /// 0.0.0.0:8080 (every address) or [::]:8080.
        #[arg(long, group = "action")]
        listen: Option<String>,
        /// For --connect (default tcp) and --send (default udp).
        #[arg(long, value_enum)]
        protocol: Option<ProtocolArg>,
        /// For --connect and --send: a name the daemon would know for the address (learnt
        /// from DNS); repeatable. `host:` rules match it.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum RecordsCmd {
    /// Check every record: signatures, contiguous sequence, previous hashes, forks, embedded
    /// approver decisions, self-approvals. Prints a summary; the exit status says valid or not.
    Verify {
        /// A spool directory, an evidence bundle directory, or the collector's URL
        /// (https://collector:7443; needs --collector-key and --token-file).
        path: PathBuf,
        /// A host public key (SPKI PEM, e.g. host.key.pub); repeatable. Default for a
        /// bundle: its keys/hosts/.
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        /// An approver public key; repeatable. Default for a bundle: its keys/approvers/.
        #[arg(long = "approver-key")]
        approver_keys: Vec<PathBuf>,
        /// For a URL: the collector's public key (its heads statement must verify with it).
        #[arg(long)]
        collector_key: Option<PathBuf>,
        /// For a URL: a file holding an export token the collector accepts.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// For a URL: a CA certificate (PEM) to trust for the collector's TLS certificate.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// For a URL: start of the period (RFC 3339, inclusive).
        #[arg(long)]
        from: Option<String>,
        /// For a URL: end of the period (RFC 3339, exclusive).
        #[arg(long)]
        to: Option<String>,
    },
    /// Hand this host's records chain to a new host key (root; the running daemon writes a
    /// key-rotated record signed by the old key, then replaces the key file).
    RotateKey {
        #[arg(long)]
        socket_dir: Option<PathBuf>,
    },
    /// Write an evidence bundle of a period from the collector's database (run where the
    /// collector runs): population CSV, raw signed records, public keys, the collector's
    /// signed heads, and the verification report. Exits non-zero if the bundle does not verify.
    Export {
        /// The collector's configuration file (its database and key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start of the period (RFC 3339, inclusive; default: the beginning).
        #[arg(long)]
        from: Option<String>,
        /// End of the period (RFC 3339, exclusive; default: now and later).
        #[arg(long)]
        to: Option<String>,
        /// The bundle directory to write (must not hold a bundle yet).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum RequestsCmd {
    /// Every held request with its full context.
    List {
        #[arg(long)]
        json: bool,
        /// With --approver: pending (default), approved, denied, killed, expired or all.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        filter: cli::requests::Filter,
        #[command(flatten)]
        page: cli::requests::Page,
    },
    /// Let exactly the held action run.
    Approve {
        id: u64,
        /// Why (with --approver; required when the rule asks for a reason).
        #[arg(long)]
        reason: Option<String>,
        /// With --approver: also give a grant the rule offers (binary, destination, tree).
        #[arg(long, requires = "approver")]
        grant: Option<String>,
    },
    /// Refuse it: the syscall fails with EPERM (an exec held after loading is killed). On this
    /// host, instead of an id, every held request a filter selects (`--all`: every one).
    Deny {
        #[arg(
            required_unless_present_any = ["all", "label", "kind", "pid"],
            conflicts_with_all = ["all", "label", "kind", "pid"]
        )]
        id: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        filter: cli::requests::Filter,
        /// Every held request (with a filter: every one it selects).
        #[arg(long)]
        all: bool,
    },
    /// Kill the process with SIGKILL. On this host, instead of an id, every held request a
    /// filter selects (`--all`: every one).
    Kill {
        #[arg(
            required_unless_present_any = ["all", "label", "kind", "pid"],
            conflicts_with_all = ["all", "label", "kind", "pid"]
        )]
        id: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        filter: cli::requests::Filter,
        /// Every held request (with a filter: every one it selects).
        #[arg(long)]
        all: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::InternalCanary { port } => ebpf::canary_main(port),
        Cmd::InternalCanaryExec => ebpf::canary_exec_main(),
        Cmd::Exec {
            label,
            socket_dir,
            command,
        } => cli::exec::run(&paths::socket_dir(socket_dir), &label, &command),
        Cmd::Daemon(args) => report(daemon(args)),
        Cmd::Approver {
            action: None,
            config,
        } => {
            init_logging();
            report(approver::run(&config))
        }
        Cmd::Approver {
            action: Some(ApproverCmd::HashToken { new }),
            ..
        } => report(cli::token::hash_token(new)),
        Cmd::Policy {
            action: PolicyCmd::Check { files, cgroups },
        } => cli::policy::check(&files, cgroups),
        Cmd::Policy {
            action:
                PolicyCmd::Test {
                    files,
                    label,
                    exec,
                    connect,
                    send,
                    socket,
                    unix,
                    listen,
                    protocol,
                    hosts,
                },
        } => {
            let protocol = |default| match protocol.unwrap_or(default) {
                ProtocolArg::Tcp => policy::schema::Protocol::Tcp,
                ProtocolArg::Udp => policy::schema::Protocol::Udp,
            };
            let hosts: Vec<String> = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            let what = if let Some(cmd) = exec {
                cli::policy::TestAction::Exec(cmd)
            } else if let Some(target) = connect {
                cli::policy::TestAction::Connect {
                    target,
                    protocol: protocol(ProtocolArg::Tcp),
                    hosts,
                    send: false,
                }
            } else if let Some(target) = send {
                cli::policy::TestAction::Connect {
                    target,
                    protocol: protocol(ProtocolArg::Udp),
                    hosts,
                    send: true,
                }
            } else if let Some(s) = socket {
                cli::policy::TestAction::Socket(s)
            } else if let Some(u) = unix {
                cli::policy::TestAction::Unix(u)
            } else if let Some(l) = listen {
                cli::policy::TestAction::Listen(l)
            } else {
                unreachable!(
                    "clap requires one of --exec, --connect, --send, --socket, --unix, --listen"
                )
            };
            report(cli::policy::test(&files, &label, &what))
        }
        Cmd::Records {
            action:
                RecordsCmd::Verify {
                    path,
                    keys,
                    approver_keys,
                    collector_key,
                    token_file,
                    ca_file,
                    from,
                    to,
                },
        } => report(cli::records::verify(&cli::records::VerifyArgs {
            path,
            host_keys: keys,
            approver_keys,
            collector_key,
            token_file,
            ca_file,
            from,
            to,
        })),
        Cmd::Records {
            action:
                RecordsCmd::Export {
                    config,
                    from,
                    to,
                    out,
                },
        } => report(records_export(config, from, to, &out)),
        Cmd::Records {
            action: RecordsCmd::RotateKey { socket_dir },
        } => report(cli::records::rotate_key(&paths::socket_dir(socket_dir))),
        Cmd::Collector { config } => report(collector(config)),
        Cmd::Off {
            config,
            socket_dir,
            bpf_pin_dir,
        } => report(off(config, socket_dir, bpf_pin_dir)),
        Cmd::Status { socket_dir, json } => {
            report(cli::status::run(&paths::socket_dir(socket_dir), json))
        }
        Cmd::Requests {
            action,
            socket_dir,
            remote,
        } => match remote.remote() {
            Some(remote) => report(match action {
                RequestsCmd::List {
                    json,
                    state,
                    filter,
                    page,
                } => filter
                    .only_here()
                    .and_then(|()| page.only_here())
                    .and_then(|()| remote.list(state.as_deref(), json)),
                RequestsCmd::Approve { id, reason, grant } => {
                    remote.approve(id, reason.as_deref(), grant.as_deref())
                }
                RequestsCmd::Deny {
                    id, reason, filter, ..
                } => cli::requests::one_id(id, &filter)
                    .and_then(|id| remote.answer(id, Decision::Deny, reason.as_deref())),
                RequestsCmd::Kill {
                    id, reason, filter, ..
                } => cli::requests::one_id(id, &filter)
                    .and_then(|id| remote.answer(id, Decision::Kill, reason.as_deref())),
            }),
            None => {
                let dir = paths::socket_dir(socket_dir);
                report(match action {
                    RequestsCmd::List {
                        json, filter, page, ..
                    } => cli::requests::list(&dir, json, &filter, &page),
                    RequestsCmd::Approve { id, .. } => {
                        cli::requests::decide(&dir, id, Decision::Approve)
                    }
                    RequestsCmd::Deny { id, filter, .. } => {
                        cli::requests::decide_some(&dir, id, &filter, Decision::Deny)
                    }
                    RequestsCmd::Kill { id, filter, .. } => {
                        cli::requests::decide_some(&dir, id, &filter, Decision::Kill)
                    }
                })
            }
        },
        Cmd::Grants {
            action,
            socket_dir,
            remote,
        } => match remote.remote() {
            Some(remote) => report(match action {
                GrantsCmd::List { json } => remote.grants(json),
                GrantsCmd::Revoke { id } => remote.revoke(&id),
            }),
            None => {
                let dir = paths::socket_dir(socket_dir);
                report(match action {
                    GrantsCmd::List { json } => cli::requests::grants(&dir, json),
                    GrantsCmd::Revoke { id } => cli::requests::revoke(&dir, &id),
                })
            }
        },
    };
    std::process::exit(code);
}

fn off(
    config: Option<PathBuf>,
    socket_dir: Option<PathBuf>,
    bpf_pin_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = DaemonConfig::load(config.as_deref())?;
    if let Some(d) = socket_dir {
        config.socket_dir = d;
    }
    if let Some(d) = bpf_pin_dir {
        config.bpf_pin_dir = d;
    }
    cli::off::run(&config)
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("countersign: {e:#}");
            1
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COUNTERSIGN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    init_logging();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("the daemon must run as root (it loads eBPF programs)");
    }
    let mut config = DaemonConfig::load(args.config.as_deref())?;
    if let Some(d) = args
        .socket_dir
        .or_else(|| std::env::var_os(paths::ENV_SOCKET_DIR).map(PathBuf::from))
    {
        config.socket_dir = d;
    }
    if let Some(p) = args.bpf_pin_dir {
        config.bpf_pin_dir = p;
    }
    if !args.policy.is_empty() {
        config.policy = args.policy;
    }
    if let Some(l) = args.decision_log {
        config.decision_log = l;
    }
    if let Some(k) = args.host_key {
        config.host_key = k;
    }
    if let Some(url) = args.approver {
        let mut a = config
            .approver
            .take()
            .unwrap_or_else(|| daemon::remote::RemoteConfig {
                url: String::new(),
                enroll_token_file: None,
                ca_file: None,
                public_key: None,
                state: std::path::PathBuf::from(paths::DEFAULT_APPROVER_STATE),
            });
        a.url = url;
        config.approver = Some(a);
    }
    if let Some(t) = args.enroll_token_file {
        match config.approver.as_mut() {
            Some(a) => a.enroll_token_file = Some(t),
            None => anyhow::bail!("--enroll-token-file needs an approver (--approver URL)"),
        }
    }
    if let Some(d) = args.spool_dir {
        config.spool_dir = d;
    }
    if let Some(m) = args.mode {
        config.mode = m;
    }
    if let Some(t) = args.request_timeout {
        config.request_timeout_secs = t;
    }
    if let Some(a) = args.timeout_action {
        config.timeout_action = a;
    }
    if let Some(h) = args.fallback_exec_hold {
        config.fallback_exec_hold = h;
    }
    if let Some(t) = args.on_tamper {
        config.on_tamper = t;
    }
    if let Some(s) = args.on_stop {
        config.on_stop = s;
    }
    if let Some(n) = args.max_held_requests {
        config.max_held_requests = n;
    }
    config
        .validate(std::path::Path::new("command line"))
        .context("invalid settings")?;
    daemon::run(config)
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COUNTERSIGN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn collector_config(path: Option<PathBuf>) -> anyhow::Result<collector::config::CollectorConfig> {
    let path = path.unwrap_or_else(|| PathBuf::from(paths::DEFAULT_COLLECTOR_CONFIG));
    Ok(collector::config::CollectorConfig::load(&path)?)
}

fn collector(config: Option<PathBuf>) -> anyhow::Result<()> {
    init_tracing();
    let config = collector_config(config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(collector::run(config))
}

fn records_export(
    config: Option<PathBuf>,
    from: Option<String>,
    to: Option<String>,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let config = collector_config(config)?;
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(collector::export::export(
            &config,
            from.as_deref(),
            to.as_deref(),
            out,
        ))?;
    print!("{}", cli::records::render(&report));
    println!("bundle written to {}", out.display());
    if !report.ok() {
        anyhow::bail!("the exported bundle does not verify: {}", report.summary());
    }
    Ok(())
}
