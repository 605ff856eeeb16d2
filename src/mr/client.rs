//! Talking to the coordinator as a user: submitting jobs and following them. Used by `mrd` and the tests.

use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::mr::job::JobSpec;
use crate::mr::MrError;
use crate::proto::mr as pb;
use crate::proto::mr::coordinator_client::CoordinatorClient;
use crate::security::Security;

/// How often [`wait`] polls; progress bars look live and the coordinator barely notices.
const POLL: Duration = Duration::from_millis(200);

/// Connects to the coordinator at `addr` (`host:port`) with `security`, failing fast if nothing listens
/// there or the TLS handshake is refused ([`MrError::Tls`]).
pub async fn connect(
    addr: &str,
    security: &Security,
) -> Result<CoordinatorClient<Channel>, MrError> {
    let endpoint = security
        .endpoint_for(addr, &crate::security::Role::Coordinator)
        .map_err(|err| MrError::Other(format!("bad coordinator address {addr}: {err}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| MrError::connect(addr, source))?;
    Ok(CoordinatorClient::new(channel))
}

/// Submits a job and returns its id once the coordinator has made it durable.
pub async fn submit(
    client: &mut CoordinatorClient<Channel>,
    spec: &JobSpec,
    overwrite: bool,
) -> Result<u64, MrError> {
    let reply = client
        .submit(pb::SubmitRequest {
            spec: Some(pb::JobSpec::from(spec)),
            overwrite,
        })
        .await?;
    Ok(reply.into_inner().job_id)
}

/// Every job's status, or only `job_id`'s; with `tasks`, one row per task (at most
/// [`MAX_STATUS_TASKS`](crate::mr::coordinator_service::MAX_STATUS_TASKS) per job).
pub async fn status(
    client: &mut CoordinatorClient<Channel>,
    job_id: Option<u64>,
    tasks: bool,
) -> Result<Vec<pb::JobStatus>, MrError> {
    Ok(status_reply(client, job_id, tasks).await?.jobs)
}

/// [`status`], with how many older jobs the coordinator left out to keep its reply small
/// ([`STATUS_REPLY_BYTES`](crate::mr::coordinator_service::STATUS_REPLY_BYTES)).
pub async fn status_reply(
    client: &mut CoordinatorClient<Channel>,
    job_id: Option<u64>,
    tasks: bool,
) -> Result<pb::StatusReply, MrError> {
    let reply = client
        .status(pb::StatusRequest {
            job_id: job_id.unwrap_or(0),
            tasks,
        })
        .await?;
    Ok(reply.into_inner())
}

/// Whether a job will change no more.
pub fn finished(status: &pb::JobStatus) -> bool {
    matches!(
        pb::JobState::try_from(status.state),
        Ok(pb::JobState::Done | pb::JobState::Failed)
    )
}

/// Polls job `job_id` until it is done or failed, calling `progress` with every status seen; rides out a
/// coordinator restart shorter than `patience`. A refusal (permission, TLS) ends the wait at once. The
/// polls are small (no task rows); the final status returned has them.
pub async fn wait(
    addr: &str,
    security: &Security,
    job_id: u64,
    patience: Duration,
    mut progress: impl FnMut(&pb::JobStatus),
) -> Result<pb::JobStatus, MrError> {
    let mut client = None;
    let mut last_ok = Instant::now();
    loop {
        let result = match client.as_mut() {
            Some(c) => status(c, Some(job_id), false).await,
            None => match connect(addr, security).await {
                Ok(c) => status(client.insert(c), Some(job_id), false).await,
                Err(err) => Err(err),
            },
        };
        match result {
            Ok(jobs) => {
                last_ok = Instant::now();
                let Some(job) = jobs.into_iter().next() else {
                    return Err(MrError::Other(format!("no job {job_id}")));
                };
                progress(&job);
                if finished(&job) {
                    let with_tasks = match client.as_mut() {
                        Some(c) => status(c, Some(job_id), true).await.ok(),
                        None => None,
                    };
                    return Ok(with_tasks
                        .and_then(|jobs| jobs.into_iter().next())
                        .unwrap_or(job));
                }
            }
            Err(MrError::Rpc(status)) if status.code() == tonic::Code::NotFound => {
                return Err(MrError::Rpc(status));
            }
            Err(err) if err.is_refusal() => return Err(err),
            Err(err) => {
                if last_ok.elapsed() > patience {
                    return Err(err);
                }
                client = None;
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
