//! The `RaftAdmin` service every replica serves on its client port: the group's membership as this
//! node sees it, membership changes and leadership transfer (`kvctl member ...`,
//! `kvctl transfer-leader`). Reading is open to any identity of the cluster, as status is; changing
//! needs an admin certificate. Changes are answered only once committed, so a `kvctl member add`
//! that returns has really happened.

use crate::proto::raft as pb;
use crate::proto::raft::raft_admin_server::{RaftAdmin, RaftAdminServer};
use crate::raft::{
    Membership, MembershipChange, MembershipError, NodeError, NodeId, NodeStatus, NotLeader,
    RaftHandle, Role,
};
use crate::security::Guard;
use std::collections::HashMap;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long a change may take to commit before the caller is told to check again.
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// How long a transfer may take (the core gives up after an election timeout).
const TRANSFER_WAIT: Duration = Duration::from_secs(3);

/// One replica's `RaftAdmin` service.
#[derive(Clone)]
pub struct AdminService {
    handle: RaftHandle,
    guard: Guard,
    /// The group's cluster id, reported to joining nodes.
    cluster: String,
    /// The tag of the backup the group was restored from, reported to joining nodes.
    restored: Option<String>,
    /// Members' client addresses, for naming the leader in refusals.
    clients: HashMap<NodeId, String>,
}

impl AdminService {
    /// The service of the node behind `handle`.
    pub fn new(
        handle: RaftHandle,
        guard: Guard,
        cluster: String,
        clients: HashMap<NodeId, String>,
    ) -> Self {
        AdminService {
            handle,
            guard,
            cluster,
            restored: None,
            clients,
        }
    }

    /// Reports `tag` (of the backup the group was restored from) to joining nodes, which must carry
    /// it on the wire to be heard.
    pub fn with_restored(mut self, tag: Option<String>) -> Self {
        self.restored = tag;
        self
    }

    /// As a tonic service.
    pub fn into_server(self) -> RaftAdminServer<Self> {
        RaftAdminServer::new(self)
    }

    fn not_leader(&self, hint: Option<NodeId>) -> Status {
        let hint = hint.or(self.handle.status().raft.leader);
        Status::failed_precondition(match hint {
            None => "not the leader (no leader known yet); try another member".to_string(),
            Some(id) => match self.clients.get(&id) {
                Some(address) => format!("not the leader (the leader is node {id} at {address})"),
                None => format!("not the leader (the leader is node {id})"),
            },
        })
    }

    fn refusal(&self, error: NodeError) -> Status {
        match error {
            NodeError::NotLeader(NotLeader::NotLeader { leader_hint })
            | NodeError::Membership(MembershipError::NotLeader(NotLeader::NotLeader {
                leader_hint,
            })) => self.not_leader(leader_hint),
            NodeError::NotLeader(NotLeader::TransferInProgress)
            | NodeError::Membership(MembershipError::NotLeader(NotLeader::TransferInProgress)) => {
                Status::unavailable("leadership is being handed over; try again")
            }
            NodeError::Membership(e) => match e {
                MembershipError::ChangePending { .. }
                | MembershipError::LeaderNotReady
                | MembershipError::LearnerBehind { .. } => Status::unavailable(e.to_string()),
                MembershipError::AlreadyMember(_) | MembershipError::AlreadyVoter(_) => {
                    Status::already_exists(e.to_string())
                }
                MembershipError::UnknownMember(_) => Status::not_found(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            },
            NodeError::Stopped => Status::unavailable("the node is stopping"),
            other => Status::internal(other.to_string()),
        }
    }
}

/// The membership a node reports: its configuration in force, with progress if it leads.
pub fn members_response(status: &NodeStatus) -> pb::MembersResponse {
    let raft = &status.raft;
    let leading = raft.role == Role::Leader;
    let matched = |id: NodeId| {
        if id == raft.id {
            raft.last_index
        } else {
            raft.progress
                .iter()
                .find(|(peer, _, _)| *peer == id)
                .map_or(0, |&(_, matched, _)| matched)
        }
    };
    pb::MembersResponse {
        id: raft.id,
        leader: raft.leader.unwrap_or(0),
        term: raft.term,
        commit: raft.commit,
        last_index: raft.last_index,
        progress_known: leading,
        leader_address: String::new(),
        cluster: String::new(),
        restored: String::new(),
        members: raft
            .membership
            .members()
            .map(|(id, member)| pb::MemberStatus {
                id,
                address: member.address.clone(),
                learner: member.learner,
                match_index: if leading { matched(id) } else { 0 },
            })
            .collect(),
    }
}

/// Longest peer address a configuration carries (every member's is in every config entry).
const MAX_ADDRESS_BYTES: usize = 255;

/// An address others can dial, as `--peers` requires, and of a sane length.
fn valid_address(address: &str) -> bool {
    address.len() <= MAX_ADDRESS_BYTES && crate::address::is_dialable(address)
}

/// The change a request asks for, or why it is malformed.
pub fn change_from_proto(request: pb::ChangeMembersRequest) -> Result<MembershipChange, Status> {
    use pb::change_members_request::Change;
    match request.change {
        Some(Change::AddLearner(member)) => {
            if member.id == 0 {
                return Err(Status::invalid_argument("node ids start at 1"));
            }
            if !valid_address(&member.address) {
                return Err(Status::invalid_argument(format!(
                    "{:?} is not the new member's peer address (HOST:PORT)",
                    member.address
                )));
            }
            Ok(MembershipChange::AddLearner {
                id: member.id,
                address: member.address,
            })
        }
        Some(Change::Promote(id)) => Ok(MembershipChange::Promote { id }),
        Some(Change::Remove(id)) => Ok(MembershipChange::Remove { id }),
        None => Err(Status::invalid_argument("no change given")),
    }
}

#[tonic::async_trait]
impl RaftAdmin for AdminService {
    async fn members(
        &self,
        request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.guard.caller(&request)?;
        let mut reply = members_response(&self.handle.status());
        reply.leader_address = self.clients.get(&reply.leader).cloned().unwrap_or_default();
        reply.cluster = self.cluster.clone();
        reply.restored = self.restored.clone().unwrap_or_default();
        Ok(Response::new(reply))
    }

    async fn change_members(
        &self,
        request: Request<pb::ChangeMembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.guard
            .allow(&request, "change the membership", |role| {
                *role == crate::security::Role::Admin
            })?;
        let change = change_from_proto(request.into_inner())?;
        let (index, term) = self
            .handle
            .change_membership(change.clone())
            .await
            .map_err(|e| self.refusal(e))?;
        let committed = self
            .handle
            .wait_committed(index, term, COMMIT_WAIT)
            .await
            .map_err(|e| self.refusal(e))?;
        if !committed {
            return Err(Status::unavailable(format!(
                "{change} (log index {index}) did not commit in time or leadership changed: \
                 check `kvctl member list` before retrying"
            )));
        }
        Ok(Response::new(members_response(&self.handle.status())))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        self.guard.allow(&request, "transfer leadership", |role| {
            *role == crate::security::Role::Admin
        })?;
        let target = request.into_inner().target;
        let status = self.handle.status();
        let membership: &Membership = &status.raft.membership;
        if !membership.is_voter(target) {
            return Err(Status::invalid_argument(format!(
                "node {target} is not a voter ({membership})"
            )));
        }
        if status.raft.leader == Some(target) {
            return Ok(Response::new(pb::TransferLeaderResponse {
                leader: target,
                term: status.raft.term,
            }));
        }
        self.handle
            .transfer_leadership(target)
            .await
            .map_err(|e| self.refusal(e))?;
        let mut watch = self.handle.subscribe();
        let moved = tokio::time::timeout(
            TRANSFER_WAIT,
            watch.wait_for(|s| s.raft.role != Role::Leader && s.raft.leader.is_some()),
        )
        .await;
        match moved {
            Ok(Ok(status)) => Ok(Response::new(pb::TransferLeaderResponse {
                leader: status.raft.leader.unwrap_or(0),
                term: status.raft.term,
            })),
            _ => Err(Status::unavailable(format!(
                "node {target} did not take over within {TRANSFER_WAIT:?} (is it reachable and caught up?)"
            ))),
        }
    }
}
