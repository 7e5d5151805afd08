//! Tracepoint record layouts, read from the running kernel's own format files (fields have
//! moved between kernel versions; hard-coding them would break on some hosts).
use crate::paths::TRACEFS_ROOTS;

/// Mounts tracefs at its usual place when no tracefs is mounted: attaching tracepoints needs
/// it, and minimal hosts (and VMs) do not always mount it.
pub fn ensure_tracefs() -> Result<(), String> {
    if TRACEFS_ROOTS
        .iter()
        .any(|r| std::path::Path::new(r).join("events").is_dir())
    {
        return Ok(());
    }
    let target = TRACEFS_ROOTS[0];
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("no tracefs mounted and mounting it at {target} failed: {e}"))
}

/// Offset of `field` in the record of tracepoint `category/name`.
pub fn field_offset(category: &str, name: &str, field: &str) -> Result<u32, String> {
    let mut tried = Vec::new();
    for root in TRACEFS_ROOTS {
        let path = format!("{root}/events/{category}/{name}/format");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return parse_offset(&text, field)
                    .ok_or_else(|| format!("{path}: no field `{field}` with an offset"));
            }
            Err(e) => tried.push(format!("{path}: {e}")),
        }
    }
    Err(format!(
        "tracepoint format not readable (is tracefs mounted?): {}",
        tried.join("; ")
    ))
}

fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let ident = decl.rsplit([' ', '*']).next()?;
        let ident = ident.split('[').next()?;
        if ident != field {
            return None;
        }
        let offset = rest
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    const FORK_6_1: &str = "name: sched_process_fork
ID: 312
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";

    const FORK_DATA_LOC: &str = "format:
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    #[test]
    fn finds_child_pid_in_both_layouts() {
        assert_eq!(parse_offset(FORK_6_1, "child_pid"), Some(44));
        assert_eq!(parse_offset(FORK_DATA_LOC, "child_pid"), Some(20));
        assert_eq!(parse_offset(FORK_6_1, "parent_comm"), Some(8));
    }

    #[test]
    fn unknown_field_is_none() {
        assert_eq!(parse_offset(FORK_6_1, "child"), None);
        assert_eq!(parse_offset("", "child_pid"), None);
    }
}
