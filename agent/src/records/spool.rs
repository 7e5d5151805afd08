//! The durable local spool: records are appended here, synced to disk, before the decision
//! they state is applied; the shipper reads them from here; nothing leaves before the
//! collector's receipt says it arrived.
//!
//! Layout of the spool directory (mode 0700):
//! - `seg-NNNNNNNNNNNN.log`: segments, appended in order of their number; a new one is begun
//!   when the current one would pass [`SEGMENT_BYTES`];
//! - `cursor.json`: the last record the collector receipted (`chain_id`, `seq`), written
//!   atomically.
//!
//! Each record in a segment is one frame: `CSR1` (4 bytes), the payload length (u32, little
//! endian), the SHA-256 of the payload (32 bytes), then the payload: the canonical JSON of the
//! record's DSSE envelope. Opening the spool checks the last segment frame by frame and cuts
//! it at the first frame that is incomplete or does not match its checksum (a torn write of a
//! crash); the chain continues from the last whole record. A bad frame in an earlier segment
//! is never cut: readers report it.
use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::{Body, PAYLOAD_RECORD, RECORD_VERSION, Record, RecordError, record_hash};
use crate::sign::{self, dsse::Envelope};

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"CSR1";
/// Bytes before a frame's payload.
pub const HEADER_BYTES: usize = 4 + 4 + 32;
/// Largest record payload (an envelope with a full request view is a few KiB).
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
/// A new segment is begun when the current one would grow past this.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// The cursor file.
pub const CURSOR_FILE: &str = "cursor.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `payload` as one frame.
#[must_use]
pub fn frame(payload: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&sha2::Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// The frames of a segment: each payload's byte range, and where and why the whole frames
/// end early (`None`: the segment ends with a whole frame).
#[must_use]
pub fn scan(bytes: &[u8]) -> (Vec<std::ops::Range<usize>>, Option<(usize, String)>) {
    use sha2::Digest as _;
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER_BYTES {
            return (
                frames,
                Some((at, format!("{} bytes of a frame header", rest.len()))),
            );
        }
        if &rest[..4] != MAGIC {
            return (frames, Some((at, "no frame starts here".into())));
        }
        let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD_BYTES {
            return (
                frames,
                Some((at, format!("frame length {len} is too large"))),
            );
        }
        if rest.len() < HEADER_BYTES + len {
            return (
                frames,
                Some((
                    at,
                    format!(
                        "frame of {len} bytes has only {}",
                        rest.len() - HEADER_BYTES
                    ),
                )),
            );
        }
        let payload = &rest[HEADER_BYTES..HEADER_BYTES + len];
        if sha2::Sha256::digest(payload).as_slice() != &rest[8..40] {
            return (frames, Some((at, "checksum does not match".into())));
        }
        frames.push(at + HEADER_BYTES..at + HEADER_BYTES + len);
        at += HEADER_BYTES + len;
    }
    (frames, None)
}

/// The segment files of `dir`, in order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>, RecordError> {
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("seg-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("seg-{index:012}.log"))
}

fn segment_index(path: &Path) -> u64 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("seg-"))
        .and_then(|n| n.strip_suffix(".log"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn sync_dir(dir: &Path) -> Result<(), RecordError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// One record as stored: where it is, its envelope, and the record it claims to hold.
#[derive(Debug, Clone)]
pub struct Stored {
    pub segment: PathBuf,
    /// Byte offset of the frame in its segment.
    pub offset: usize,
    /// Byte offset just after the frame (where the next record of the segment begins).
    pub end: usize,
    pub envelope: Envelope,
    /// [`super::record_hash`] of `envelope` (the SHA-256 of the stored bytes).
    pub hash: String,
}

/// What reading a spool found.
#[derive(Debug, Default)]
pub struct Contents {
    pub records: Vec<Stored>,
    /// Frames that could not be read: (segment, offset, why). A torn tail of the last
    /// segment is listed too (the daemon cuts it when it opens the spool).
    pub damaged: Vec<(PathBuf, usize, String)>,
}

/// Reads every whole record of the spool in `dir`, in order.
pub fn read(dir: &Path) -> Result<Contents, RecordError> {
    let mut out = Contents::default();
    for seg in segments(dir)? {
        read_segment(&seg, &mut out)?;
    }
    Ok(out)
}

fn read_segment(seg: &Path, out: &mut Contents) -> Result<(), RecordError> {
    let bytes = fs::read(seg).map_err(io(seg))?;
    let (frames, tail) = scan(&bytes);
    for r in frames {
        let (offset, end) = (r.start - HEADER_BYTES, r.end);
        let payload = &bytes[r];
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) => out.records.push(Stored {
                segment: seg.to_path_buf(),
                offset,
                end,
                envelope,
                hash: sign::sha256_hex(payload),
            }),
            Err(e) => out.damaged.push((
                seg.to_path_buf(),
                offset,
                format!("not a DSSE envelope: {e}"),
            )),
        }
    }
    if let Some((at, why)) = tail {
        out.damaged.push((seg.to_path_buf(), at, why));
    }
    Ok(())
}

/// The last record the collector receipted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    pub chain_id: String,
    pub seq: u64,
}

/// The receipted cursor of the spool in `dir` (`None`: nothing receipted yet).
pub fn read_cursor(dir: &Path) -> Result<Option<Cursor>, RecordError> {
    let path = dir.join(CURSOR_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RecordError::Corrupt {
                path,
                message: format!("not a cursor: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Writes the cursor atomically and durably (temp file, fsync, rename, fsync of the dir).
pub fn write_cursor(dir: &Path, cursor: &Cursor) -> Result<(), RecordError> {
    let path = dir.join(CURSOR_FILE);
    let tmp = dir.join("cursor.json.tmp");
    let bytes = serde_json::to_vec(cursor).expect("a cursor serialises");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

/// Removes the cursor (everything is to be sent again).
pub fn remove_cursor(dir: &Path) -> Result<(), RecordError> {
    let path = dir.join(CURSOR_FILE);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path)(e)),
    }
}

/// The records after `cursor` in spool order (all of them without a cursor), at most `max`.
/// Stops before the first damaged frame: nothing after damage is shipped. Errors if the
/// cursor's record is not in the spool (the spool and cursor do not belong together).
pub fn after_cursor(
    dir: &Path,
    cursor: Option<&Cursor>,
    max: usize,
) -> Result<Vec<Stored>, RecordError> {
    let mut contents = Contents::default();
    let mut started = cursor.is_none();
    let mut out = Vec::new();
    for seg in segments(dir)? {
        read_segment(&seg, &mut contents)?;
        let damaged = !contents.damaged.is_empty();
        for s in contents.records.drain(..) {
            if started {
                out.push(s);
                if out.len() >= max {
                    return Ok(out);
                }
            } else if let Some(c) = cursor
                && let Ok(r) = super::peek(&s.envelope)
                && r.chain_id == c.chain_id
                && r.seq == c.seq
            {
                started = true;
            }
        }
        if damaged {
            break;
        }
    }
    if !started {
        return Err(RecordError::Corrupt {
            path: dir.join(CURSOR_FILE),
            message: "the receipted record is not in the spool".into(),
        });
    }
    Ok(out)
}

/// Where the record after a receipted one begins: the shipper reads forward from here instead
/// of reading the spool again from its first segment (see [`after_cursor_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub segment: PathBuf,
    pub offset: usize,
}

impl Stored {
    /// Where the record after this one begins.
    #[must_use]
    pub fn next(&self) -> Position {
        Position {
            segment: self.segment.clone(),
            offset: self.end,
        }
    }
}

/// [`after_cursor`], reading forward from `at` (where the record after the cursor's begins,
/// as the shipper remembers it): only the records sent next are read and parsed, never what
/// was shipped before, so a large backlog ships in memory proportional to `max`. Without a
/// position, or with one the spool no longer has (its segment removed, or shorter than the
/// offset), the spool is read from its start as by [`after_cursor`].
pub fn after_cursor_at(
    dir: &Path,
    cursor: Option<&Cursor>,
    at: Option<&Position>,
    max: usize,
) -> Result<Vec<Stored>, RecordError> {
    let usable = at.filter(|p| fs::metadata(&p.segment).is_ok_and(|m| m.len() >= p.offset as u64));
    let Some(at) = usable else {
        return after_cursor(dir, cursor, max);
    };
    let segs = segments(dir)?;
    let Some(first) = segs.iter().position(|s| *s == at.segment) else {
        return after_cursor(dir, cursor, max);
    };
    let mut out = Vec::new();
    let mut offset = at.offset;
    for seg in &segs[first..] {
        if !read_forward(seg, offset, max, &mut out)? || out.len() >= max {
            break;
        }
        offset = 0;
    }
    Ok(out)
}

/// Reads whole frames of `seg` from `offset` into `out` until it holds `max`; whether the
/// segment was read to its end (false: stopped at `max`, or at a frame that is damaged or
/// still being written, after which nothing is read).
fn read_forward(
    seg: &Path,
    offset: usize,
    max: usize,
    out: &mut Vec<Stored>,
) -> Result<bool, RecordError> {
    use sha2::Digest as _;
    use std::io::{BufReader, Read as _, Seek as _, SeekFrom};
    let mut file = File::open(seg).map_err(io(seg))?;
    file.seek(SeekFrom::Start(offset as u64)).map_err(io(seg))?;
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut at = offset;
    while out.len() < max {
        let mut header = [0u8; HEADER_BYTES];
        let got = read_full(&mut r, &mut header).map_err(io(seg))?;
        if got == 0 {
            return Ok(true);
        }
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if got < HEADER_BYTES || &header[..4] != MAGIC || len > MAX_RECORD_BYTES {
            return Ok(false);
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut r, &mut payload).map_err(io(seg))? < len
            || sha2::Sha256::digest(&payload).as_slice() != &header[8..40]
        {
            return Ok(false);
        }
        let Ok(envelope) = serde_json::from_slice::<Envelope>(&payload) else {
            return Ok(false);
        };
        let end = at + HEADER_BYTES + len;
        out.push(Stored {
            segment: seg.to_path_buf(),
            offset: at,
            end,
            envelope,
            hash: sign::sha256_hex(&payload),
        });
        at = end;
    }
    // Stopped at `max`: the end is reached only if nothing follows.
    let mut probe = [0u8; 1];
    Ok(r.read(&mut probe).map_err(io(seg))? == 0)
}

/// Reads until `buf` is full or the end of the file; how many bytes were read.
fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Removes the segments before `segment` (the one holding the receipted record: those before
/// are all receipted), without reading any; never the last. Returns how many.
pub fn prune_before(dir: &Path, segment: &Path) -> Result<usize, RecordError> {
    let segs = segments(dir)?;
    let Some(holder) = segs.iter().position(|s| s == segment) else {
        return Ok(0);
    };
    let mut removed = 0;
    for seg in &segs[..holder.min(segs.len().saturating_sub(1))] {
        fs::remove_file(seg).map_err(io(seg))?;
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Total bytes of the spool's segments.
pub fn size(dir: &Path) -> u64 {
    segments(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The appending end of a spool (one per spool directory: the daemon's).
pub struct Spool {
    dir: PathBuf,
    key: SigningKey,
    host_id: String,
    host_name: String,
    chain_id: String,
    next_seq: u64,
    prev: Option<String>,
    segment: u64,
    file: File,
    len: u64,
    /// A failed write could not be undone: recover before the next append.
    poisoned: bool,
    /// Group commit: appends leave the flush to [`Spool::commit`].
    group: bool,
    /// Written since the last flush.
    dirty: bool,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("chain_id", &self.chain_id)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens (or makes) the spool in `dir`: cuts a torn tail, and continues the chain of the
    /// last whole record if this key signed it (or a `key-rotated` record handed over to it);
    /// otherwise begins a new chain.
    pub fn open(dir: &Path, key: SigningKey, host_name: &str) -> Result<Self, RecordError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let host_id = sign::key_id(&key.verifying_key()).0;
        let segs = segments(dir)?;
        let (segment, len) = match segs.last() {
            Some(last) => (segment_index(last), recover_tail(last)?),
            None => (1, 0),
        };
        // The head: the last whole record of the spool.
        let mut head = None;
        for seg in segs.iter().rev() {
            let mut c = Contents::default();
            read_segment(seg, &mut c)?;
            if let Some(s) = c.records.pop() {
                head = Some(s);
                break;
            }
        }
        let continued = head.as_ref().and_then(|s| {
            let r = super::peek(&s.envelope).ok()?;
            let ours = r.host_id == host_id
                || matches!(&r.body, Body::KeyRotated { new_key_id, .. } if *new_key_id == host_id);
            ours.then(|| (r.chain_id, r.seq + 1, Some(s.hash.clone())))
        });
        let (chain_id, next_seq, prev) = match continued {
            Some(c) => c,
            None => {
                if head.is_some() {
                    tracing::warn!(dir = %dir.display(), host_id,
                        "the spool's last record was signed by another key; beginning a new chain");
                }
                (super::new_chain_id()?, 1, None)
            }
        };
        let path = segment_path(dir, segment);
        let file = open_append(&path)?;
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            host_id,
            host_name: host_name.to_owned(),
            chain_id,
            next_seq,
            prev,
            segment,
            file,
            len,
            poisoned: false,
            group: false,
            dirty: false,
        })
    }

    /// Starts (or ends) a group commit: until [`Spool::commit`], appends write without
    /// waiting for the disk, so that the decisions of one batch cost one flush. Whatever was
    /// appended in the group is durable only once `commit` returned `Ok`.
    pub fn group_commit(&mut self, on: bool) {
        self.group = on;
    }

    /// Makes everything appended so far durable (nothing to do if it is).
    pub fn commit(&mut self) -> Result<(), RecordError> {
        if !self.dirty {
            return Ok(());
        }
        self.dirty = false;
        if let Err(e) = self.file.sync_data() {
            // What reached the disk is unknown: the next append reads the chain again.
            self.poisoned = true;
            return Err(io(&segment_path(&self.dir, self.segment))(e));
        }
        Ok(())
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }

    /// The seq the next record gets.
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Signs `body` as the next record of the chain and appends it, synced to disk, before
    /// returning its seq. On error nothing was appended (a partial write is cut off again).
    pub fn append(&mut self, body: Body) -> Result<u64, RecordError> {
        if self.poisoned {
            let mut reopened = Self::open(&self.dir, self.key.clone(), &self.host_name)?;
            reopened.group = self.group;
            *self = reopened;
        }
        let record = Record {
            v: RECORD_VERSION,
            host_id: self.host_id.clone(),
            host_name: self.host_name.clone(),
            chain_id: self.chain_id.clone(),
            seq: self.next_seq,
            prev: self.prev.clone(),
            time: super::now_rfc3339(),
            body,
        };
        let env = Envelope::sign_json(PAYLOAD_RECORD, &record, &self.key)?;
        let bytes = sign::canonical(&env)?;
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        let framed = frame(&bytes);
        if self.len > 0 && self.len + framed.len() as u64 > SEGMENT_BYTES {
            // The segment left behind is complete and durable before the next one begins.
            self.commit()?;
            let path = segment_path(&self.dir, self.segment + 1);
            self.file = open_append(&path)?;
            sync_dir(&self.dir)?;
            self.segment += 1;
            self.len = 0;
        }
        let path = segment_path(&self.dir, self.segment);
        let group = self.group;
        let written = self
            .file
            .write_all(&framed)
            .and_then(|()| if group { Ok(()) } else { self.file.sync_data() });
        if let Err(e) = written {
            // Cut what may have been written, so the next record does not follow garbage.
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                self.poisoned = true;
            }
            return Err(io(&path)(e));
        }
        self.len += framed.len() as u64;
        self.dirty |= group;
        self.prev = Some(record_hash(&env)?);
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Hands the chain over to `new_key`: a `key-rotated` record signed by the current key,
    /// then every later record is signed by `new_key`.
    pub fn rotate(&mut self, new_key: SigningKey) -> Result<u64, RecordError> {
        let public = new_key.verifying_key();
        let seq = self.append(Body::KeyRotated {
            new_key_id: sign::key_id(&public).0,
            new_public_key: sign::keys::public_pem(&public),
        })?;
        self.host_id = sign::key_id(&public).0;
        self.key = new_key;
        Ok(seq)
    }
}

fn open_append(path: &Path) -> Result<File, RecordError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// Cuts the segment at `path` after its last whole frame (a torn write); its new length.
fn recover_tail(path: &Path) -> Result<u64, RecordError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let (_, tail) = scan(&bytes);
    let Some((at, why)) = tail else {
        return Ok(bytes.len() as u64);
    };
    // A crash tears only the last write; whole frames after the damage mean something else
    // changed the file: refuse rather than cut records that may not be receipted.
    if let Some(later) = frame_after(&bytes, at) {
        return Err(RecordError::Corrupt {
            path: path.to_path_buf(),
            message: format!(
                "damaged frame at offset {at} ({why}) is followed by a whole one at offset {later}; not a torn write, so nothing is cut: move the segment aside to go on"
            ),
        });
    }
    tracing::warn!(segment = %path.display(), offset = at, cut = bytes.len() - at, why,
        "cutting a torn record at the end of the spool");
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(at as u64).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(at as u64)
}

/// The offset of a whole frame starting after `at`, if there is one.
fn frame_after(bytes: &[u8], at: usize) -> Option<usize> {
    (at + 1..bytes.len().saturating_sub(HEADER_BYTES))
        .filter(|&i| &bytes[i..i + 4] == MAGIC)
        .find(|&i| !scan(&bytes[i..]).0.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DecisionRecord, peek, tests::view};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn decision(id: u64) -> Body {
        Body::Decision(DecisionRecord {
            decision: "approved".into(),
            applied: "released".into(),
            by: "cli uid=0 pid=1".into(),
            request: view(id),
            action_hash: "00".into(),
            on_behalf_of: None,
            approver_decision: None,
        })
    }

    fn records(dir: &Path) -> Vec<Record> {
        read(dir)
            .unwrap()
            .records
            .iter()
            .map(|s| {
                s.envelope
                    .verify_json(PAYLOAD_RECORD, &key(1).verifying_key())
                    .unwrap()
            })
            .collect()
    }

    /// Environment variable that turns the test below into the writer it kills.
    const WRITER_ENV: &str = "COUNTERSIGN_TEST_SPOOL_WRITER";
    /// What the writer prints once its first record is stored.
    const WRITER_STARTED: &str = "writer-started";

    #[test]
    fn sigkill_during_writes_leaves_a_spool_that_recovers_and_verifies() {
        if let Some(dir) = std::env::var_os(WRITER_ENV) {
            // The writer: append as fast as possible until killed; says when the first
            // record is stored, so that a slow start on a busy machine is not taken for a
            // writer that wrote nothing.
            let mut s = Spool::open(Path::new(&dir), key(1), "h").unwrap();
            let heartbeat = || Body::Heartbeat {
                pending: 0,
                interval_secs: 1,
            };
            s.append(heartbeat()).unwrap();
            println!("{WRITER_STARTED}");
            loop {
                s.append(heartbeat()).unwrap();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut expected_next = 1;
        for round in 0..12u64 {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "records::spool::tests::sigkill_during_writes_leaves_a_spool_that_recovers_and_verifies",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(WRITER_ENV, dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let out = child.stdout.take().unwrap();
            let started = std::io::BufRead::lines(std::io::BufReader::new(out))
                .map_while(Result::ok)
                .any(|l| l.trim_end().ends_with(WRITER_STARTED));
            assert!(started, "round {round}: the writer did not start");
            // Kill it at a different point of its writing each round.
            std::thread::sleep(std::time::Duration::from_millis(5 + round * 7));
            child.kill().unwrap();
            child.wait().unwrap();
            // Reopening recovers; what is stored is whole and the chain is unbroken.
            let s = Spool::open(dir.path(), key(1), "h").unwrap();
            let contents = read(dir.path()).unwrap();
            assert!(contents.damaged.is_empty(), "{:?}", contents.damaged);
            let mut keys = crate::records::verify::Keys::default();
            keys.add_host(key(1).verifying_key());
            let mut v = crate::records::verify::Verifier::new(keys);
            for r in &contents.records {
                v.feed(&r.envelope, "spool");
            }
            let report = v.finish(&[]);
            assert!(report.ok(), "round {round}: {:?}", report.failures);
            assert!(
                s.next_seq() > expected_next,
                "round {round}: the writer wrote nothing"
            );
            assert_eq!(s.next_seq() - 1, contents.records.len() as u64);
            expected_next = s.next_seq();
        }
    }

    #[test]
    fn appends_chain_and_restart_continues_seq_and_prev() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        assert_eq!(s.append(decision(1)).unwrap(), 1);
        assert_eq!(s.append(decision(2)).unwrap(), 2);
        let chain = s.chain_id().to_owned();
        drop(s);
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        assert_eq!(s.chain_id(), chain);
        assert_eq!(s.append(decision(3)).unwrap(), 3);
        let stored = read(dir.path()).unwrap();
        assert!(stored.damaged.is_empty());
        let rs = records(dir.path());
        assert_eq!(rs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rs[0].prev, None);
        for (r, before) in rs[1..].iter().zip(&stored.records) {
            assert_eq!(r.prev.as_deref(), Some(before.hash.as_str()));
            assert_eq!(r.chain_id, chain);
        }
        // The stored bytes' hash is the envelope's canonical hash.
        assert_eq!(
            record_hash(&stored.records[0].envelope).unwrap(),
            stored.records[0].hash
        );
    }

    #[test]
    fn a_torn_write_is_cut_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        s.append(decision(1)).unwrap();
        s.append(decision(2)).unwrap();
        drop(s);
        let seg = segments(dir.path()).unwrap().pop().unwrap();
        let whole = fs::read(&seg).unwrap();
        // A third frame, torn halfway through (a crash during the write).
        let next = frame(&whole[HEADER_BYTES..HEADER_BYTES + 100]);
        let mut torn = whole.clone();
        torn.extend_from_slice(&next[..next.len() / 2]);
        fs::write(&seg, &torn).unwrap();
        assert_eq!(read(dir.path()).unwrap().damaged.len(), 1);
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        assert_eq!(fs::read(&seg).unwrap(), whole, "the torn frame is cut");
        assert_eq!(s.append(decision(3)).unwrap(), 3);
        let rs = records(dir.path());
        assert_eq!(rs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn garbage_and_a_bad_checksum_at_the_tail_are_cut() {
        for damage in [b"garbage!".to_vec(), vec![0u8; 3], {
            // A whole frame whose payload does not match its checksum.
            let mut f = frame(b"{\"x\":1}");
            let n = f.len();
            f[n - 2] ^= 1;
            f
        }] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
            s.append(decision(1)).unwrap();
            drop(s);
            let seg = segments(dir.path()).unwrap().pop().unwrap();
            let whole = fs::read(&seg).unwrap();
            let mut bad = whole.clone();
            bad.extend_from_slice(&damage);
            fs::write(&seg, &bad).unwrap();
            let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
            assert_eq!(fs::read(&seg).unwrap(), whole);
            assert_eq!(s.append(decision(2)).unwrap(), 2);
            assert_eq!(records(dir.path()).len(), 2);
        }
    }

    #[test]
    fn another_key_begins_a_new_chain_and_rotation_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        s.append(decision(1)).unwrap();
        let first = s.chain_id().to_owned();
        s.rotate(key(2)).unwrap();
        assert_eq!(s.append(decision(2)).unwrap(), 3);
        drop(s);
        // Key 2 took the chain over: it goes on after a restart.
        let s = Spool::open(dir.path(), key(2), "h").unwrap();
        assert_eq!((s.chain_id(), s.next_seq()), (first.as_str(), 4));
        drop(s);
        // A key the chain never handed over to begins a new chain.
        let s = Spool::open(dir.path(), key(3), "h").unwrap();
        assert_ne!(s.chain_id(), first);
        assert_eq!(s.next_seq(), 1);
    }

    #[test]
    fn cursor_selects_what_is_left_to_ship_and_prune_keeps_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        for i in 1..=5 {
            s.append(decision(i)).unwrap();
        }
        assert_eq!(read_cursor(dir.path()).unwrap(), None);
        assert_eq!(after_cursor(dir.path(), None, 100).unwrap().len(), 5);
        assert_eq!(after_cursor(dir.path(), None, 2).unwrap().len(), 2);
        let c = Cursor {
            chain_id: s.chain_id().into(),
            seq: 3,
        };
        write_cursor(dir.path(), &c).unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), Some(c.clone()));
        let left = after_cursor(dir.path(), Some(&c), 100).unwrap();
        let seqs: Vec<u64> = left
            .iter()
            .map(|s| peek(&s.envelope).unwrap().seq)
            .collect();
        assert_eq!(seqs, [4, 5]);
        let bogus = Cursor {
            chain_id: "nope".into(),
            seq: 1,
        };
        assert!(after_cursor(dir.path(), Some(&bogus), 100).is_err());
        // One segment only: nothing is removed.
        let holder = &left[0].segment;
        assert_eq!(prune_before(dir.path(), holder).unwrap(), 0);
        assert_eq!(records(dir.path()).len(), 5);
    }

    #[test]
    fn shipping_reads_forward_from_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        for i in 1..=5 {
            s.append(decision(i)).unwrap();
        }
        let seqs = |v: &[Stored]| -> Vec<u64> {
            v.iter().map(|s| peek(&s.envelope).unwrap().seq).collect()
        };
        let first = after_cursor_at(dir.path(), None, None, 2).unwrap();
        assert_eq!(seqs(&first), [1, 2]);
        let c = Cursor {
            chain_id: s.chain_id().into(),
            seq: 2,
        };
        // From where the receipted record ends: the same as reading the whole spool.
        let at = first[1].next();
        let forward = after_cursor_at(dir.path(), Some(&c), Some(&at), 100).unwrap();
        assert_eq!(seqs(&forward), [3, 4, 5]);
        assert_eq!(
            forward.iter().map(|s| s.hash.clone()).collect::<Vec<_>>(),
            after_cursor(dir.path(), Some(&c), 100)
                .unwrap()
                .iter()
                .map(|s| s.hash.clone())
                .collect::<Vec<_>>()
        );
        // At the end, nothing; a record appended later is found from there.
        let end = forward[2].next();
        assert!(
            after_cursor_at(dir.path(), None, Some(&end), 100)
                .unwrap()
                .is_empty()
        );
        s.append(decision(6)).unwrap();
        assert_eq!(
            seqs(&after_cursor_at(dir.path(), None, Some(&end), 100).unwrap()),
            [6]
        );
        // A frame still being written (a torn tail) is not read past.
        drop(s);
        let seg = forward[0].segment.clone();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&frame(b"{}")[..10]).unwrap();
        assert_eq!(
            seqs(&after_cursor_at(dir.path(), None, Some(&end), 100).unwrap()),
            [6]
        );
        // A position the spool no longer has: read from the start.
        let gone = Position {
            segment: dir.path().join("seg-999999999999.log"),
            offset: 0,
        };
        assert_eq!(
            seqs(&after_cursor_at(dir.path(), Some(&c), Some(&gone), 100).unwrap()),
            [3, 4, 5, 6]
        );
    }

    #[test]
    fn a_damaged_frame_stops_shipping_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), key(1), "h").unwrap();
        for i in 1..=3 {
            s.append(decision(i)).unwrap();
        }
        drop(s);
        let seg = segments(dir.path()).unwrap().pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let (frames, _) = scan(&bytes);
        // Flip a byte inside the second record's payload.
        bytes[frames[1].start + 10] ^= 0x20;
        fs::write(&seg, &bytes).unwrap();
        let left = after_cursor(dir.path(), None, 100).unwrap();
        assert_eq!(left.len(), 1, "nothing at or after the damage is shipped");
        // Damage followed by whole records is not a torn write: nothing is cut.
        let e = Spool::open(dir.path(), key(1), "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a torn write"), "{e}");
        assert_eq!(fs::read(&seg).unwrap(), bytes);
    }
}
