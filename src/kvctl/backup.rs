//! `kvctl snapshot save | status`: take a backup of a replicated service from its leader into a file,
//! and say what a backup file holds. Restoring is `kvd ... --restore FILE` (see
//! [`crate::replica::restore`]). The file layout is [`crate::rsm::backup`]'s.
//!
//! A save never leaves a file that looks like a backup but is not one: the bytes go to `FILE.part`,
//! checked as they arrive (a stream past its declared length, or declaring a snapshot over the limit,
//! ends the save at once), then flushed, read back and checked again before it is linked to `FILE`;
//! an existing `FILE` is never overwritten. Neither step holds the backup in memory.

use crate::kv::ClerkConfig;
use crate::proto::ctrler::ctrler_client::CtrlerClient;
use crate::proto::kv::kv_client::KvClient;
use crate::proto::rsm::{BackupChunk, BackupRequest};
use crate::rsm::backup::{self, BackupHeader};
use crate::security::Role;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// Which service to back up, and where its servers are.
#[derive(Clone, Debug)]
pub struct Target {
    /// The servers' client addresses (any of them; the leader answers).
    pub servers: Vec<String>,
    /// The certificate role they must present: `kv`, `ctrler` or `shard-GID`.
    pub role: Role,
}

/// Longest wait for the next piece of a backup once it is streaming.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for a server to start sending: a leader encodes the whole state first (a follower
/// refuses at once, and a leader cut off from its quorum within its request timeout).
const ENCODE_TIMEOUT: Duration = Duration::from_secs(600);

/// Take a backup from `target`'s leader into `file` and return its header. Tries every server until
/// the leader answers or `config.call_timeout` passes; a server that is not the leader is skipped, a
/// refusal no retry can fix (no permission, TLS, a backup over `limit` bytes of snapshot) ends it at
/// once. `progress` gets the bytes received so far. Without a `limit`, the space free where `file`
/// goes is one: a save holds nothing in memory, and a backup larger than the disk cannot be kept.
pub async fn save(
    target: &Target,
    config: &ClerkConfig,
    file: &Path,
    limit: Option<u64>,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<BackupHeader> {
    if file.exists() {
        anyhow::bail!(
            "{} exists; remove it or choose another name (a backup is never written over a file)",
            file.display()
        );
    }
    if target.servers.is_empty() {
        anyhow::bail!("no servers to back up");
    }
    let part = part_path(file);
    let limit = match limit {
        Some(limit) => Limit::Given(limit),
        None => free_bytes(file).map_or(Limit::Given(u64::MAX), Limit::FreeSpace),
    };
    let deadline = Instant::now() + config.call_timeout;
    let mut last_refusal = String::from("no server answered");
    loop {
        for server in &target.servers {
            match save_from(server, target, config, &part, limit, &mut progress).await {
                Ok(header) => {
                    // A link, not a rename: it fails rather than replace a FILE that appeared
                    // meanwhile (another save of the same name).
                    let linked = std::fs::hard_link(&part, file);
                    let _ = std::fs::remove_file(&part);
                    linked.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                    sync_parent(file)?;
                    return Ok(header);
                }
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry(why)) => {
                    // A leader's own answer says more than the followers' pointing at it.
                    if !why.starts_with("not the leader") || last_refusal.starts_with("no server") {
                        last_refusal = format!("{server}: {why}");
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("no leader gave a backup in time; last answer: {last_refusal}");
        }
        // Between rounds: a leader may be being elected.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The largest snapshot a save takes, and where that number came from (for the refusal).
#[derive(Clone, Copy, Debug)]
enum Limit {
    /// `--max-snapshot-bytes`.
    Given(u64),
    /// The bytes free on the file system the backup goes to.
    FreeSpace(u64),
}

impl Limit {
    fn bytes(self) -> u64 {
        match self {
            Limit::Given(bytes) | Limit::FreeSpace(bytes) => bytes,
        }
    }
}

/// Bytes an unprivileged writer may still use on the file system `file` goes to.
fn free_bytes(file: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(parent_dir(file)).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

enum Attempt {
    /// Another server, or a later round, may do.
    Retry(String),
    /// Nothing will.
    Final(anyhow::Error),
}

async fn save_from(
    server: &str,
    target: &Target,
    config: &ClerkConfig,
    part: &Path,
    limit: Limit,
    progress: &mut impl FnMut(u64),
) -> Result<BackupHeader, Attempt> {
    let channel = crate::rsm::client::channel_to(server, config, Some(&target.role))
        .map_err(|e| Attempt::Final(e.into()))?;
    let call = async {
        match target.role {
            Role::Ctrler => CtrlerClient::new(channel).backup(BackupRequest {}).await,
            _ => KvClient::new(channel).backup(BackupRequest {}).await,
        }
    };
    let mut stream = match tokio::time::timeout(ENCODE_TIMEOUT.max(config.call_timeout), call).await
    {
        Err(_) => return Err(Attempt::Retry("no answer".into())),
        Ok(Err(status)) => {
            return Err(match status.code() {
                Code::FailedPrecondition | Code::Unavailable | Code::DeadlineExceeded => {
                    Attempt::Retry(status.message().to_string())
                }
                _ => Attempt::Final(anyhow::anyhow!("{server}: {}", status.message())),
            })
        }
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(part)
        .map_err(|e| {
            Attempt::Final(anyhow::anyhow!(
                "{}: {e} (another save of the same name is running, or one was interrupted: \
                 remove it)",
                part.display()
            ))
        })?;
    let received = receive(&mut stream, &mut out, part, server, limit, progress).await;
    if received.is_err() {
        // Ours, made above: never leave a broken file behind (and never touch another save's).
        let _ = std::fs::remove_file(part);
    }
    received
}

/// The rest of [`save_from`]: write the stream into `out` (the open `part`), flush and check it.
async fn receive(
    stream: &mut tonic::Streaming<BackupChunk>,
    out: &mut std::fs::File,
    part: &Path,
    server: &str,
    limit: Limit,
    progress: &mut impl FnMut(u64),
) -> Result<BackupHeader, Attempt> {
    let retry_io = |e: std::io::Error| Attempt::Final(anyhow::anyhow!("{}: {e}", part.display()));
    // Sent whole but wrong: not a transient failure, and not something to keep.
    let wrong = |e: backup::BackupError| {
        Attempt::Final(match (e, limit) {
            (backup::BackupError::TooLarge { snapshot_bytes, .. }, Limit::FreeSpace(free)) => {
                anyhow::anyhow!(
                    "{server}'s backup holds a {snapshot_bytes}-byte snapshot, more than the \
                     {free} bytes free in {} (--max-snapshot-bytes overrides this check)",
                    parent_dir(part).display()
                )
            }
            (e, _) => anyhow::anyhow!("{server} sent a backup that does not check out: {e}"),
        })
    };
    let mut checker = backup::Checker::new(limit.bytes());
    let mut received = 0u64;
    loop {
        let next = tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await;
        let chunk: BackupChunk = match next {
            Err(_) => return Err(Attempt::Retry("the backup stream stalled".into())),
            Ok(Err(status)) => {
                return Err(Attempt::Retry(format!(
                    "the backup stream broke: {}",
                    status.message()
                )))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        checker.push(&chunk.data).map_err(wrong)?;
        out.write_all(&chunk.data).map_err(retry_io)?;
        received += chunk.data.len() as u64;
        progress(received);
    }
    checker.finish().map_err(wrong)?;
    out.sync_all().map_err(retry_io)?;
    // What the disk holds, not what was sent: read back, without holding it.
    backup::check_file(part, limit.bytes()).map_err(|e| {
        Attempt::Final(anyhow::anyhow!(
            "{}: the written backup does not read back: {e}",
            part.display()
        ))
    })
}

fn part_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// The directory that holds `file`.
fn parent_dir(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Make a rename durable: fsync the directory that holds `file`.
fn sync_parent(file: &Path) -> std::io::Result<()> {
    std::fs::File::open(parent_dir(file))?.sync_all()
}

/// What `kvctl snapshot status` prints about a backup file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// The header.
    pub header: BackupHeader,
    /// The file's size.
    pub file_bytes: u64,
    /// Its checksum (checked).
    pub checksum: String,
    /// Keys held (for a controllers' backup: configurations held).
    pub keys: u64,
    /// Client sessions in the dedup table.
    pub sessions: u64,
}

/// Read and check a backup file whole (a truncated or corrupt one is an error saying so) and count
/// what it holds by loading it into the machine it came from. A snapshot over `limit` bytes is
/// refused from the header, before the file is read.
pub fn inspect(file: &Path, limit: u64) -> anyhow::Result<Summary> {
    let backup =
        backup::read_file(file, limit).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let (keys, sessions) = crate::replica::backup_contents(&backup.header.service, backup.snapshot)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(Summary {
        file_bytes: backup.file_bytes,
        checksum: format!("{:08x}", backup.checksum),
        keys,
        sessions,
        header: backup.header,
    })
}

/// The summary as a few aligned lines.
pub fn render(summary: &Summary) -> String {
    let h = &summary.header;
    let taken =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(h.created_unix_ms) * 1_000_000)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| format!("{} ms after the epoch", h.created_unix_ms));
    let what = if h.service == "ctrler" {
        "configurations"
    } else {
        "keys"
    };
    format!(
        "service     {}\ncluster     {}\nindex       {} (term {})\ntaken       {taken} by node {}\n\
         size        {} bytes (snapshot {})\n{what:<11} {}\nsessions    {}\nchecksum    {} (ok)\n",
        h.service,
        h.cluster_id,
        h.index,
        h.term,
        h.taken_by,
        summary.file_bytes,
        h.snapshot_bytes,
        summary.keys,
        summary.sessions,
        summary.checksum,
    )
}
