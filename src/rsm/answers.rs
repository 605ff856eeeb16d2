//! A bound on the memory a server gives to answers its callers have not read.
//!
//! HTTP/2 lets a client hold each of its streams' windows at zero: the server can then send none of
//! an answer, and keeps it until the stream or the connection goes. A Get's answer holds a copy of
//! its value (up to [`crate::limits::MAX_VALUE_BYTES`]), and a client may have
//! [`crate::limits::MAX_REQUESTS_PER_CONNECTION`] streams on each of up to
//! [`crate::limits::MAX_CONNECTIONS_PER_LISTENER`] connections: unbounded, one holder of a client
//! certificate could make a replica keep a terabyte of answers, and the kernel would kill it.
//!
//! So an answer that carries a value reserves its encoded size from an [`AnswerBudget`] before it
//! goes out, and the reservation ([`AnswerPermit`]) rides with the response body and every piece
//! of data it hands to HTTP/2 ([`HoldsAnswerPermits`]): it is given back once all are dropped —
//! written to the socket, or their stream or connection gone. One caller (a certificate's identity; without TLS, an IP address) holds at most
//! [`crate::limits::MAX_UNSENT_ANSWER_BYTES_PER_CALLER`], the process at most
//! [`crate::limits::MAX_UNSENT_ANSWER_BYTES`]: past them a read is refused as overloaded (clerks back
//! off and retry), so a caller that reads nothing holds up only itself, until the process-wide bound.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};

/// How a read refused for its caller's unread answers begins: clerks take it, like admission
/// control's refusal, as "nothing was done; back off and retry".
pub const OVERLOADED: &str = "server overloaded";

/// The answer bytes the servers of one process hold unsent, by caller, against two bounds.
#[derive(Debug)]
pub struct AnswerBudget {
    total_limit: usize,
    caller_limit: usize,
    usage: Mutex<Usage>,
}

#[derive(Debug, Default)]
struct Usage {
    total: usize,
    /// Only callers holding some: an entry goes when its last permit does.
    by_caller: HashMap<Arc<str>, usize>,
}

/// Why an answer could not be reserved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetExceeded {
    /// This caller already holds its share unread.
    #[error("this caller already has {held} bytes of answers it has not read (at most {limit}): read them, then retry")]
    Caller {
        /// Bytes the caller holds.
        held: usize,
        /// Its bound.
        limit: usize,
    },
    /// All callers together hold the process's bound.
    #[error("the server holds {held} bytes of answers its callers have not read (at most {limit}); retry after a pause")]
    Process {
        /// Bytes held.
        held: usize,
        /// The bound.
        limit: usize,
    },
}

/// The budget every server of this process shares: memory is the process's, whichever port an
/// answer waits on.
static PROCESS_BUDGET: LazyLock<Arc<AnswerBudget>> = LazyLock::new(|| {
    AnswerBudget::new(
        crate::limits::MAX_UNSENT_ANSWER_BYTES,
        crate::limits::MAX_UNSENT_ANSWER_BYTES_PER_CALLER,
    )
});

impl AnswerBudget {
    /// A budget of `total_limit` bytes, at most `caller_limit` of them one caller's.
    pub fn new(total_limit: usize, caller_limit: usize) -> Arc<AnswerBudget> {
        Arc::new(AnswerBudget {
            total_limit,
            caller_limit,
            usage: Mutex::new(Usage::default()),
        })
    }

    /// The process's budget, which the servers use.
    pub fn process() -> Arc<AnswerBudget> {
        PROCESS_BUDGET.clone()
    }

    /// Reserves `bytes` for `caller`'s answer, if neither bound is passed; held until the permit (and
    /// every clone of it) is dropped.
    pub fn reserve(
        self: &Arc<Self>,
        caller: &str,
        bytes: usize,
    ) -> Result<AnswerPermit, BudgetExceeded> {
        let mut usage = self.lock();
        let held = usage.by_caller.get(caller).copied().unwrap_or(0);
        if held.saturating_add(bytes) > self.caller_limit {
            return Err(BudgetExceeded::Caller {
                held,
                limit: self.caller_limit,
            });
        }
        if usage.total.saturating_add(bytes) > self.total_limit {
            return Err(BudgetExceeded::Process {
                held: usage.total,
                limit: self.total_limit,
            });
        }
        usage.total += bytes;
        let caller: Arc<str> = match usage.by_caller.get_key_value(caller) {
            Some((key, _)) => key.clone(),
            None => Arc::from(caller),
        };
        *usage.by_caller.entry(caller.clone()).or_insert(0) += bytes;
        Ok(AnswerPermit(Arc::new(Reservation {
            budget: self.clone(),
            caller,
            bytes,
        })))
    }

    /// Bytes held by all callers.
    pub fn held(&self) -> usize {
        self.lock().total
    }

    /// The usage, whatever a panicking holder left (the counts are updated in single steps).
    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bytes of an [`AnswerBudget`] reserved for one answer, given back when the last clone is dropped.
/// Cloneable because a response's extensions must be; put into the response's extensions, it is
/// moved into the body by [`HoldsAnswerPermits`].
#[derive(Clone, Debug)]
pub struct AnswerPermit(#[allow(dead_code)] Arc<Reservation>);

#[derive(Debug)]
struct Reservation {
    budget: Arc<AnswerBudget>,
    caller: Arc<str>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut usage = self.budget.lock();
        usage.total = usage.total.saturating_sub(self.bytes);
        if let Some(held) = usage.by_caller.get_mut(&self.caller) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                usage.by_caller.remove(&self.caller);
            }
        }
    }
}

/// Who a call's answers are counted against: its certificate's identity, or without TLS the address
/// it came from (the best name there is for a caller nobody authenticated) — for IPv6 its /64, what
/// one host is usually given, so a host cannot take a share per address it rotates through.
pub fn caller_key(
    principal: Option<&crate::security::Principal>,
    remote: Option<std::net::SocketAddr>,
) -> String {
    use std::net::IpAddr;
    match (principal, remote.map(|a| a.ip().to_canonical())) {
        (Some(principal), _) => principal.uri(),
        (None, Some(IpAddr::V6(ip))) => {
            let segments = ip.segments();
            format!(
                "address {:x}:{:x}:{:x}:{:x}::/64",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
        (None, Some(IpAddr::V4(ip))) => format!("address {ip}"),
        (None, None) => "unknown".to_string(),
    }
}

/// A gRPC service whose answers keep the [`AnswerPermit`] their handler put in the response's
/// extensions until their body is dropped, so the bytes count until they have left (or never will).
#[derive(Clone, Debug)]
pub struct HoldsAnswerPermits<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for HoldsAnswerPermits<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for HoldsAnswerPermits<S>
where
    S: tower_service::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::MapOk<
        S::Future,
        fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use futures::TryFutureExt;
        self.0.call(request).map_ok(with_permit_in_body)
    }
}

/// `response` with the permit in its extensions, if any, moved into its body.
fn with_permit_in_body(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    match response.extensions_mut().remove::<AnswerPermit>() {
        Some(permit) => response.map(|body| tonic::body::Body::new(PermittedBody { body, permit })),
        None => response,
    }
}

/// A response body holding its answer's reservation for as long as it lives, and giving every piece
/// of data it hands out a share of it. Why the pieces too: hyper passes a chunk to h2 once the stream
/// has any send window, and h2 keeps it until it is written to the socket — however small the
/// window, and for as long as the client does not read its socket. So the reservation goes only once
/// the body and every piece of it are gone: sent, or their stream or connection closed.
struct PermittedBody {
    body: tonic::body::Body,
    permit: AnswerPermit,
}

/// A piece of an answer's data holding a share of its reservation ([`PermittedBody`]).
struct PermittedBytes {
    data: bytes::Bytes,
    _permit: AnswerPermit,
}

impl AsRef<[u8]> for PermittedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl http_body::Body for PermittedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| {
                frame.map_data(|data| {
                    bytes::Bytes::from_owner(PermittedBytes {
                        data,
                        _permit: this.permit.clone(),
                    })
                })
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reservation outlives the body for as long as any data it handed out does: HTTP/2 keeps
    /// that data until it is written to the socket (review: a client that stops reading its socket
    /// with its windows open held answers the budget no longer counted).
    #[tokio::test]
    async fn the_data_a_body_handed_out_keeps_its_reservation() {
        use http_body_util::BodyExt;
        let budget = AnswerBudget::new(1 << 20, 1 << 20);
        let answer = bytes::Bytes::from(vec![7u8; 1000]);
        let mut response = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(
            answer.clone(),
        )));
        response
            .extensions_mut()
            .insert(budget.reserve("a", 1000).expect("reserve"));
        let mut body = with_permit_in_body(response).into_body();
        let frame = body.frame().await.expect("a frame").expect("data");
        let data = frame.into_data().expect("data");
        assert_eq!(data, answer);
        drop(body);
        assert_eq!(budget.held(), 1000, "given back while its data was unsent");
        drop(data);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_caller_holds_at_most_its_share_and_all_callers_the_total() {
        let budget = AnswerBudget::new(100, 60);
        let first = budget.reserve("a", 50).expect("within both");
        let past_share = budget.reserve("a", 11).expect_err("a's share");
        let other = budget.reserve("b", 50).expect("b's own share");
        let past_total = budget.reserve("c", 1).expect_err("the total");
        let (held, limit) = (50, 60);
        assert_eq!(past_share, BudgetExceeded::Caller { held, limit });
        let (held, limit) = (100, 100);
        assert_eq!(past_total, BudgetExceeded::Process { held, limit });
        let clone = first.clone();
        drop(first);
        assert_eq!(budget.held(), 100, "a clone still holds the bytes");
        drop(clone);
        assert_eq!(budget.held(), 50);
        budget.reserve("a", 50).expect("given back");
        drop(other);
        assert_eq!(budget.held(), 0);
        assert!(
            budget.lock().by_caller.is_empty(),
            "no entry for callers holding nothing"
        );
    }
}
