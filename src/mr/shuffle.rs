//! Moving map outputs to reducers.
//!
//! In the shared-directory mode mappers write `mr-<map>-<reduce>.job<job>` into the job's output directory and
//! reducers read them from there. In the gRPC mode mappers keep them under their own `--dir` and serve them
//! with [`ShuffleService`]; reducers pull them with [`Fetcher`]. Either way a missing output is reported as
//! such, and the coordinator re-runs the map task that produced it.
//!
//! With TLS only other workers (role `worker`) may fetch: map outputs are the job's data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc::error::SendTimeoutError;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::mr::job::intermediate_name;
use crate::mr::MrError;
use crate::proto::mr as pb;
use crate::proto::mr::shuffle_client::ShuffleClient;
use crate::proto::mr::shuffle_server::ShuffleServer;
use crate::security::{Admit, Guard, Role, Security};

/// Chunk size of a fetch stream: well under gRPC's 4 MiB message limit.
const CHUNK: usize = 1 << 20;
/// Attempts per fetch before the map output is declared lost; rides out a momentary hiccup without
/// delaying the re-execution of a map whose worker is really gone by more than a second.
const FETCH_ATTEMPTS: u32 = 3;

/// How often a reducer pings the mappers it fetches from, and how long it waits for the answer before
/// it drops the connection (and the fetch on it): a mapper that cannot answer a ping within this is
/// paused or hung, and its outputs are reported lost long before the reduce's task timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a worker keeps the map outputs it serves for `job_id`.
pub fn local_job_dir(worker_dir: &Path, job_id: u64) -> PathBuf {
    worker_dir.join(format!("job-{job_id}"))
}

/// Serves this worker's map outputs.
pub struct ShuffleService {
    dir: PathBuf,
    guard: Guard,
    /// One permit per fetch being served: the open files and chunks in memory stay bounded however
    /// many reducers ask at once.
    fetches: std::sync::Arc<tokio::sync::Semaphore>,
    /// A reader that takes no chunk for this long loses its fetch (and its permit).
    stalled_reader: Duration,
    /// ... or that takes fewer bytes a second than this over such a stretch.
    min_bytes_per_second: u64,
    /// How long a fetch waits for a permit before it is refused as busy.
    permit_wait: Duration,
}

/// Fetches served at once; more wait (see [`PERMIT_WAIT`]).
pub const MAX_CONCURRENT_FETCHES: usize = 64;

/// How long a fetch waits for a permit before it is refused as busy: well under a reducer's idle
/// timeout, so the reducer hears why instead of timing out.
const PERMIT_WAIT: Duration = Duration::from_secs(10);

/// A reducer that stops reading a fetch for this long loses it.
const STALLED_READER: Duration = Duration::from_secs(30);

/// The slowest a fetch may move, averaged over each stall window (`idle`, `stalled_reader`): a
/// peer that trickles (a byte, or a chunk, just before each stall timeout) would otherwise hold a
/// reducer, or a mapper's fetch permit, for ever. Low, as a mapper's bandwidth is shared: its 64
/// fetches at this rate are 4 MiB/s (32 Mbit/s), which a congested link or a busy disk still gives,
/// while a 1 GiB partition at this rate ends within hours rather than never.
pub const MIN_FETCH_BYTES_PER_SECOND: u64 = 64 << 10;

/// A transfer's progress in windows of a stall timeout: each window that passes before the
/// transfer ends must have moved `min_bytes` (the window × the minimum rate).
#[derive(Debug)]
struct Progress {
    window: Duration,
    min_bytes: u64,
    ends: tokio::time::Instant,
    moved: u64,
}

impl Progress {
    /// From now; at least a byte a window, whatever the rate (a rate of 0 must not turn off the
    /// stall timeout too).
    fn new(window: Duration, min_bytes_per_second: u64) -> Self {
        let min_bytes = (window.as_secs_f64() * min_bytes_per_second as f64) as u64;
        Progress {
            window,
            min_bytes: min_bytes.max(1),
            ends: window_end(window),
            moved: 0,
        }
    }

    fn moved(&mut self, bytes: usize) {
        self.moved += bytes as u64;
    }

    /// What is left of the current window.
    fn left(&self) -> Duration {
        self.ends
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// The current window has ended: a new one starts if it moved enough; otherwise what it moved.
    fn window_ended(&mut self) -> Result<(), u64> {
        if self.moved < self.min_bytes {
            return Err(self.moved);
        }
        self.ends = window_end(self.window);
        self.moved = 0;
        Ok(())
    }
}

/// `window` from now (a window too long to add is a year).
fn window_end(window: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(window)
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600))
}

impl ShuffleService {
    /// Serves the outputs under `worker_dir` (see [`local_job_dir`]) to the callers `guard` admits as
    /// workers.
    pub fn new(worker_dir: PathBuf, guard: Guard) -> Self {
        Self::with_limits(worker_dir, guard, MAX_CONCURRENT_FETCHES, STALLED_READER)
    }

    /// As [`ShuffleService::new`], with `concurrent` fetches at most and a reader that stalls for
    /// `stalled_reader` cut off.
    pub fn with_limits(
        worker_dir: PathBuf,
        guard: Guard,
        concurrent: usize,
        stalled_reader: Duration,
    ) -> Self {
        Self {
            dir: worker_dir,
            guard,
            fetches: std::sync::Arc::new(tokio::sync::Semaphore::new(concurrent)),
            stalled_reader,
            min_bytes_per_second: MIN_FETCH_BYTES_PER_SECOND,
            permit_wait: PERMIT_WAIT,
        }
    }

    /// With a fetch refused as busy after waiting `wait` for a permit.
    pub fn with_permit_wait(mut self, wait: Duration) -> Self {
        self.permit_wait = wait;
        self
    }

    /// With readers slower than `bytes_per_second` (over each stall timeout) cut off.
    pub fn with_min_rate(mut self, bytes_per_second: u64) -> Self {
        self.min_bytes_per_second = bytes_per_second;
        self
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::FetchChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::shuffle_server::Shuffle for ShuffleService {
    type FetchStream = ChunkStream;

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.guard
            .allow(&request, "fetch map outputs", |role| *role == Role::Worker)?;
        let request = request.into_inner();
        let path = local_job_dir(&self.dir, request.job_id).join(intermediate_name(
            request.job_id,
            request.map_index,
            request.reduce_index,
            request.attempt,
        ));
        let not_found = || {
            Status::not_found(format!(
                "no output of attempt {} of map {} for reduce {} of job {} here",
                request.attempt, request.map_index, request.reduce_index, request.job_id
            ))
        };
        let failed = |path: &Path, err: std::io::Error| {
            Status::internal(format!("{}: {err}", path.display()))
        };
        let permit = match tokio::time::timeout(
            self.permit_wait,
            self.fetches.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(Status::resource_exhausted(
                    "this worker serves as many fetches as it may at once; retry later",
                ))
            }
        };
        // Open and size the file in one trip to the blocking pool; a small output (most are, with a
        // combiner) is read in the same trip and sent as one chunk.
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(
                move || -> std::io::Result<(std::fs::File, u64, Option<Vec<u8>>)> {
                    let mut file = crate::mr::fsutil::open_exact(&path)?;
                    let len = file.metadata()?.len();
                    let small = if len <= CHUNK as u64 {
                        let mut data = Vec::with_capacity(len as usize);
                        std::io::Read::read_to_end(&mut file, &mut data)?;
                        Some(data)
                    } else {
                        None
                    };
                    Ok((file, len, small))
                },
            )
            .await
            .map_err(|err| Status::internal(format!("reading a map output: {err}")))?
        };
        let (file, len, small) = match opened {
            Ok(opened) => opened,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
            Err(err) => return Err(failed(&path, err)),
        };
        // The chunks come from a task that holds the permit and gives up on a reader that stops
        // taking them: memory per fetch is one chunk in flight plus one queued, however big the file.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::FetchChunk, Status>>(1);
        let stalled = self.stalled_reader;
        let min_rate = self.min_bytes_per_second;
        // Set once every chunk is queued: a stream that ends without it was cut off, and says so
        // rather than end as if the file were shorter.
        let complete = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let completed = complete.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(data) = small {
                let chunk = pb::FetchChunk {
                    data: Bytes::from(data),
                };
                if tx.send_timeout(Ok(chunk), stalled).await.is_ok() {
                    completed.store(true, std::sync::atomic::Ordering::Release);
                }
                return;
            }
            let mut file = tokio::fs::File::from_std(file);
            let mut progress = Progress::new(stalled, min_rate);
            let mut left = len;
            while left > 0 {
                let mut data = vec![0u8; left.min(CHUNK as u64) as usize];
                let item = match file.read_exact(&mut data).await {
                    Ok(_) => {
                        left -= data.len() as u64;
                        Ok(pb::FetchChunk {
                            data: Bytes::from(data),
                        })
                    }
                    Err(err) => {
                        left = 0;
                        Err(failed(&path, err))
                    }
                };
                let failed_read = item.is_err();
                let bytes = item.as_ref().map_or(0, |chunk| chunk.data.len());
                let mut item = item;
                let sent = loop {
                    match tx.send_timeout(item, progress.left()).await {
                        Ok(()) => break true,
                        Err(SendTimeoutError::Timeout(back)) if progress.window_ended().is_ok() => {
                            item = back;
                        }
                        Err(_) => break false,
                    }
                };
                if !sent {
                    tracing::info!(path = %path.display(), "fetch dropped: the reader went away, stopped reading or read too slowly");
                    return;
                }
                progress.moved(bytes);
                if failed_read {
                    return;
                }
            }
            completed.store(true, std::sync::atomic::Ordering::Release);
        });
        let cut_off = futures::stream::once(async move {
            (!complete.load(std::sync::atomic::Ordering::Acquire)).then(|| {
                Err(Status::aborted(
                    "fetch cut off: the reader took no chunk, or too few, for too long",
                ))
            })
        })
        .filter_map(|end| async move { end });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).chain(cut_off),
        )))
    }
}

/// Runs the shuffle server on `listener` in the background, with `security`'s TLS and guard. Fails now
/// if the TLS configuration is unusable.
pub fn spawn_server(
    listener: TcpListener,
    worker_dir: PathBuf,
    security: &Security,
) -> Result<tokio::task::JoinHandle<()>, MrError> {
    let service = ShuffleService::new(worker_dir, security.guard());
    let security = security.clone();
    Ok(tokio::spawn(async move {
        let routes = tonic::service::Routes::new(ShuffleServer::new(service));
        let result = security
            .serve(routes, listener, Admit::Cluster, std::future::pending())
            .await;
        if let Err(err) = result {
            tracing::error!(%err, "shuffle server stopped");
        }
    }))
}

/// One map output partition a reducer fetches.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    /// The job.
    pub job_id: u64,
    /// The map task that wrote it.
    pub map: u32,
    /// The partition: the reducer's index.
    pub reduce: u32,
    /// The map attempt the coordinator accepted, which names the file.
    pub attempt: u64,
}

/// How much a fetch may bring and how long it may stall: a stale or broken peer cannot run a reducer out
/// of memory or hold it forever.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    /// Largest map output partition fetched (bytes).
    pub max_bytes: usize,
    /// A fetch that receives nothing for this long fails (and is retried, then reported lost).
    pub idle: Duration,
    /// ... as does one that receives fewer bytes a second than this over such a stretch.
    pub min_bytes_per_second: u64,
    /// How long a mapper that answers "busy" (all its fetch slots taken) is asked again before the
    /// fetch fails: busy is not gone, and taking it for gone re-runs every map it holds.
    pub busy_patience: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_bytes: MAX_FETCH_BYTES,
            idle: Duration::from_secs(30),
            min_bytes_per_second: MIN_FETCH_BYTES_PER_SECOND,
            busy_patience: BUSY_PATIENCE,
        }
    }
}

/// [`FetchLimits::busy_patience`] by default: two minutes, about a dozen asks (each waits up to
/// 10 s for a slot at the mapper).
pub const BUSY_PATIENCE: Duration = Duration::from_secs(120);

/// Whether `err` is a mapper's "busy" answer (every fetch slot taken, after waiting for one).
fn is_busy(err: &MrError) -> bool {
    matches!(err, MrError::Rpc(status) if status.code() == tonic::Code::ResourceExhausted)
}

/// Largest map output partition a reducer fetches by default.
pub const MAX_FETCH_BYTES: usize = 1 << 30;

/// Fetches map outputs from other workers, reusing one connection per worker.
#[derive(Default)]
pub struct Fetcher {
    clients: HashMap<String, ShuffleClient<Channel>>,
    security: Security,
    limits: FetchLimits,
}

impl Fetcher {
    /// A fetcher that connects with `security` (other workers' shuffle servers require a worker
    /// certificate under TLS).
    pub fn new(security: Security) -> Self {
        Self {
            clients: HashMap::new(),
            security,
            limits: FetchLimits::default(),
        }
    }

    /// The same with other limits.
    pub fn with_limits(mut self, limits: FetchLimits) -> Self {
        self.limits = limits;
        self
    }

    fn client(&mut self, addr: &str) -> Result<ShuffleClient<Channel>, MrError> {
        if let Some(client) = self.clients.get(addr) {
            return Ok(client.clone());
        }
        let endpoint = self
            .security
            .endpoint_for(addr, &crate::security::Role::Worker)
            .map_err(|err| MrError::Other(format!("bad shuffle address {addr}: {err}")))?
            .connect_timeout(Duration::from_secs(2))
            // A paused or hung mapper's kernel still accepts the connection and its bytes; only its
            // silence to HTTP/2 pings tells, within seconds, not the `idle` a busy mapper is allowed.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let client = ShuffleClient::new(endpoint.connect_lazy());
        self.clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// One attempt: the partition, held in memory while it fits in `keep` bytes, else streamed into
    /// `into` (created or truncated first).
    async fn fetch_once(
        &mut self,
        addr: &str,
        request: pb::FetchRequest,
        into: &Path,
        keep: usize,
    ) -> Result<Fetched, MrError> {
        let FetchLimits {
            max_bytes,
            idle,
            min_bytes_per_second,
            ..
        } = self.limits;
        let (map, reduce) = (request.map_index, request.reduce_index);
        let stalled = || MrError::Other(format!("{addr} sent nothing for {idle:?} while fetching"));
        let mut client = self.client(addr)?;
        let mut stream = tokio::time::timeout(idle, client.fetch(request))
            .await
            .map_err(|_| stalled())??
            .into_inner();
        // From the answer on: connecting and the mapper's wait for a free slot are not transfer.
        let mut progress = Progress::new(idle, min_bytes_per_second);
        let mut held = Vec::new();
        let mut file: Option<tokio::fs::File> = None;
        let mut fetched = 0u64;
        loop {
            let Ok(next) = tokio::time::timeout(progress.left(), stream.next()).await else {
                match progress.window_ended() {
                    Ok(()) => continue,
                    Err(0) => return Err(stalled()),
                    Err(moved) => {
                        return Err(MrError::Other(format!(
                            "{addr} sent only {moved} bytes in {idle:?} while fetching (at least \
                             {min_bytes_per_second} a second expected)"
                        )))
                    }
                }
            };
            let Some(chunk) = next else { break };
            let chunk = chunk?;
            progress.moved(chunk.data.len());
            fetched += chunk.data.len() as u64;
            if fetched > max_bytes as u64 {
                return Err(MrError::Other(format!(
                    "the output of map {map} for reduce {reduce} at {addr} is over the fetch limit of \
                     {max_bytes} bytes"
                )));
            }
            match file.as_mut() {
                Some(file) => file
                    .write_all(&chunk.data)
                    .await
                    .map_err(MrError::io(into))?,
                None if fetched <= keep as u64 => held.extend_from_slice(&chunk.data),
                None => {
                    let mut spilled = tokio::fs::File::create(into)
                        .await
                        .map_err(MrError::io(into))?;
                    spilled.write_all(&held).await.map_err(MrError::io(into))?;
                    spilled
                        .write_all(&chunk.data)
                        .await
                        .map_err(MrError::io(into))?;
                    held = Vec::new();
                    file = Some(spilled);
                }
            }
        }
        match file {
            Some(mut file) => {
                file.flush().await.map_err(MrError::io(into))?;
                Ok(Fetched::File(fetched))
            }
            None => Ok(Fetched::Memory(held)),
        }
    }

    /// Fetches the map output `wanted` from the worker at `addr`: into memory if it is at most `keep`
    /// bytes, else streamed into the file `into` (a partition never sits in memory whole), retrying
    /// briefly. An error writing `into` is ours, not the peer's: it is returned at once, as `Io`.
    pub async fn fetch_to(
        &mut self,
        addr: &str,
        wanted: Wanted,
        into: &Path,
        keep: usize,
    ) -> Result<Fetched, MrError> {
        let Wanted {
            job_id,
            map,
            reduce,
            attempt,
        } = wanted;
        let request = pb::FetchRequest {
            job_id,
            map_index: map,
            reduce_index: reduce,
            attempt,
        };
        let mut attempt = 1;
        let started = tokio::time::Instant::now();
        loop {
            match self.fetch_once(addr, request, into, keep).await {
                Ok(fetched) => return Ok(fetched),
                // Busy: asked again without counting an attempt, for as long as we are patient.
                Err(err) if is_busy(&err) && started.elapsed() < self.limits.busy_patience => {
                    tracing::debug!(%addr, map, reduce, %err, "mapper busy; asking again");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                // A refused identity stays refused, and a full local disk stays full.
                Err(err)
                    if attempt >= FETCH_ATTEMPTS
                        || err.is_refusal()
                        || matches!(err, MrError::Io { .. }) =>
                {
                    return Err(err)
                }
                Err(err) => {
                    tracing::debug!(%addr, map, reduce, %err, attempt, "fetch failed; retrying");
                    self.clients.remove(addr);
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
}

/// A fetched map output.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Small enough to hold: the whole sealed output.
    Memory(Vec<u8>),
    /// Streamed into the file given: its length.
    File(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::certs;

    const WANTED: Wanted = Wanted {
        job_id: 1,
        map: 0,
        reduce: 0,
        attempt: 7,
    };

    fn security(ca: &Path, role: &str) -> Security {
        let issued = certs::issue(ca, role, "1", &[], 1).unwrap();
        Security::load_tls(&ca.join("ca.pem"), &issued.cert, &issued.key).unwrap()
    }

    /// A shuffle server that streams without end, not at all, or a byte at a time.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Rogue {
        Endless,
        Silent,
        /// A byte every `Duration`.
        Trickle(Duration),
    }

    #[tonic::async_trait]
    impl pb::shuffle_server::Shuffle for Rogue {
        type FetchStream = ChunkStream;

        async fn fetch(
            &self,
            _request: Request<pb::FetchRequest>,
        ) -> Result<Response<ChunkStream>, Status> {
            let chunk = pb::FetchChunk {
                data: Bytes::from(vec![0u8; CHUNK]),
            };
            let stream: ChunkStream = match *self {
                Rogue::Endless => Box::pin(futures::stream::repeat_with(move || Ok(chunk.clone()))),
                Rogue::Silent => Box::pin(futures::stream::pending()),
                Rogue::Trickle(every) => {
                    Box::pin(futures::stream::unfold((), move |()| async move {
                        tokio::time::sleep(every).await;
                        let byte = pb::FetchChunk {
                            data: Bytes::from_static(b"x"),
                        };
                        Some((Ok(byte), ()))
                    }))
                }
            };
            Ok(Response::new(stream))
        }
    }

    /// ... and in slowness: a peer sending a byte just before each stall timeout held a reducer
    /// for ever.
    #[tokio::test]
    async fn a_fetch_is_bounded_in_size_and_in_silence() {
        let idle = Duration::from_millis(1000);
        for rogue in [Rogue::Endless, Rogue::Silent, Rogue::Trickle(idle / 10)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let routes = tonic::service::Routes::new(ShuffleServer::new(rogue));
            let server = tokio::spawn(async move {
                Security::Insecure
                    .serve(routes, listener, Admit::Cluster, std::future::pending())
                    .await
            });
            let limits = FetchLimits {
                max_bytes: 3 * CHUNK,
                idle,
                ..FetchLimits::default()
            };
            let started = std::time::Instant::now();
            let into = tempfile::NamedTempFile::new().unwrap();
            let mut fetcher = Fetcher::default().with_limits(limits);
            let fetched = fetcher.fetch_to(&addr, WANTED, into.path(), 0);
            let err = tokio::time::timeout(Duration::from_secs(20), fetched)
                .await
                .unwrap_or_else(|_| panic!("{rogue:?}: the fetch still runs after 20 s"))
                .unwrap_err()
                .to_string();
            let expected = match rogue {
                Rogue::Endless => "over the fetch limit",
                Rogue::Silent => "sent nothing",
                Rogue::Trickle(_) => "bytes in",
            };
            assert!(err.contains(expected), "{rogue:?}: {err}");
            assert!(started.elapsed() < Duration::from_secs(15));
            server.abort();
        }
    }

    /// A worker's outputs holding a 16-chunk output of map 0 (attempt 7) for reduce 0 of job 1,
    /// served on loopback by the service `service` makes of their directory; the request for that
    /// output, and its length.
    struct BigOutput {
        dir: tempfile::TempDir,
        addr: String,
        server: tokio::task::JoinHandle<Result<(), crate::security::ServeError>>,
        request: pb::FetchRequest,
        len: usize,
    }

    async fn serve_a_big_output(service: impl FnOnce(PathBuf) -> ShuffleService) -> BigOutput {
        let dir = tempfile::tempdir().unwrap();
        let outputs = dir.path().join("outputs");
        let job = local_job_dir(&outputs, 1);
        std::fs::create_dir_all(&job).unwrap();
        let len = CHUNK * 16;
        std::fs::write(job.join(intermediate_name(1, 0, 0, 7)), vec![7u8; len]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let routes = tonic::service::Routes::new(ShuffleServer::new(service(outputs)));
        let server = tokio::spawn(async move {
            Security::Insecure
                .serve(routes, listener, Admit::Cluster, std::future::pending())
                .await
        });
        let request = pb::FetchRequest {
            job_id: 1,
            map_index: 0,
            reduce_index: 0,
            attempt: 7,
        };
        BigOutput {
            dir,
            addr,
            server,
            request,
            len,
        }
    }

    /// One slot, and a reader that opens a fetch and reads nothing: it is cut off after the stall
    /// timeout, which frees the slot for the next reducer, and never gets the whole file.
    #[tokio::test]
    async fn a_reader_that_stops_reading_loses_its_fetch_and_frees_its_slot() {
        let BigOutput {
            dir,
            addr,
            server,
            request,
            len,
        } = serve_a_big_output(|outputs| {
            ShuffleService::with_limits(outputs, Guard::open(), 1, Duration::from_millis(300))
        })
        .await;
        let mut idle = ShuffleClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut stalled = idle.fetch(request).await.unwrap().into_inner();
        let into = dir.path().join("fetched");
        let fetched = Fetcher::default().fetch_to(&addr, WANTED, &into, 0).await;
        assert_eq!(fetched.unwrap(), Fetched::File(len as u64));
        let mut got = 0;
        let mut ended = None;
        while let Some(item) = stalled.next().await {
            match item {
                Ok(chunk) => got += chunk.data.len(),
                Err(status) => {
                    ended = Some(status);
                    break;
                }
            }
        }
        // Cut off, it is told so: a short stream that ended cleanly would pass for a short file.
        let ended = ended.expect("the cut-off stream ended without an error");
        assert!(ended.message().contains("cut off"), "{ended:?}");
        assert!(got < len, "the stalled reader still got all {got} bytes");
        server.abort();
    }

    /// A reader that takes a chunk just before each stall timeout, far below the minimum rate,
    /// kept its fetch and its slot until the whole file was read.
    #[tokio::test]
    async fn a_reader_below_the_minimum_rate_loses_its_fetch() {
        let stall = Duration::from_millis(400);
        // At least 8 chunks a second; the reader takes one every 300 ms (under the stall timeout).
        // (The directory bound, not dropped: dropping it deletes the outputs.)
        let BigOutput {
            dir: _dir,
            addr,
            server,
            request,
            len,
        } = serve_a_big_output(|outputs| {
            ShuffleService::with_limits(outputs, Guard::open(), 1, stall)
                .with_min_rate(8 * CHUNK as u64)
        })
        .await;
        let mut slow = ShuffleClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut stream = slow.fetch(request).await.unwrap().into_inner();
        let mut got = 0;
        let mut ended = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => got += chunk.data.len(),
                Err(status) => {
                    ended = Some(status);
                    break;
                }
            }
            tokio::time::sleep(stall * 3 / 4).await;
        }
        let ended = ended.expect("the slow reader got the whole file");
        assert!(ended.message().contains("cut off"), "{ended:?}");
        assert!(got < len, "the slow reader got all {got} bytes");
        server.abort();
    }

    /// A mapper whose fetch slots are all taken answers "busy": it is asked again until a slot
    /// frees, without counting attempts (three busy answers made a reducer take a busy mapper for
    /// gone and have every map it held re-run).
    #[tokio::test]
    async fn a_busy_mapper_is_asked_again_until_a_slot_frees() {
        // One slot, held by a reader that reads nothing until the stall rule cuts it off (2-4 s).
        let BigOutput {
            dir,
            addr,
            server,
            request,
            ..
        } = serve_a_big_output(|outputs| {
            let small = local_job_dir(&outputs, 1).join(intermediate_name(1, 1, 0, 7));
            std::fs::write(small, b"wanted").unwrap();
            ShuffleService::with_limits(outputs, Guard::open(), 1, Duration::from_secs(2))
                .with_permit_wait(Duration::from_millis(100))
        })
        .await;
        let mut holder = ShuffleClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let _held = holder.fetch(request).await.unwrap().into_inner();
        let limits = FetchLimits {
            busy_patience: Duration::from_secs(20),
            ..FetchLimits::default()
        };
        let into = dir.path().join("fetched");
        let wanted = Wanted { map: 1, ..WANTED };
        let mut fetcher = Fetcher::default().with_limits(limits);
        let fetched = fetcher.fetch_to(&addr, wanted, &into, CHUNK);
        let fetched = tokio::time::timeout(Duration::from_secs(30), fetched)
            .await
            .expect("still fetching after 30 s");
        assert_eq!(fetched.unwrap(), Fetched::Memory(b"wanted".to_vec()));
        server.abort();
    }

    #[tokio::test]
    async fn with_tls_only_workers_fetch_map_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        certs::init(&ca, "t", 1).unwrap();
        let worker = security(&ca, "worker");
        let outputs = dir.path().join("outputs");
        let job = local_job_dir(&outputs, 1);
        std::fs::create_dir_all(&job).unwrap();
        // Two and a half chunks: the server streams it a chunk at a time, the fetcher into a file.
        let pairs: Vec<u8> = (0..CHUNK * 5 / 2).map(|i| (i % 251) as u8).collect();
        std::fs::write(job.join(intermediate_name(1, 0, 0, 7)), &pairs).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = spawn_server(listener, outputs, &worker).unwrap();
        let into = dir.path().join("fetched");
        let fetched = Fetcher::new(worker.clone())
            .fetch_to(&addr, WANTED, &into, CHUNK)
            .await;
        assert_eq!(fetched.unwrap(), Fetched::File(pairs.len() as u64));
        // Held in memory when it fits.
        let unused = dir.path().join("unused");
        let held = Fetcher::new(worker.clone())
            .fetch_to(&addr, WANTED, &unused, 3 * CHUNK)
            .await;
        assert!(held.unwrap() == Fetched::Memory(pairs.clone()));
        assert!(!unused.exists());
        assert!(
            std::fs::read(&into).unwrap() == pairs,
            "fetched bytes differ"
        );
        for role in ["client", "admin", "coordinator"] {
            let refused = Fetcher::new(security(&ca, role))
                .fetch_to(&addr, WANTED, &into, 0)
                .await
                .unwrap_err();
            assert!(matches!(refused, MrError::Denied(_)), "{role}: {refused}");
            assert!(
                refused.to_string().contains(role),
                "names the caller: {refused}"
            );
        }
        let plaintext = Fetcher::default().fetch_to(&addr, WANTED, &into, 0).await;
        assert!(plaintext.is_err(), "plaintext was served");
        server.abort();
    }
}
