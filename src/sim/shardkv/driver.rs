//! The daemon's driver, modelled: each group leader's duties performed over the simulated network with
//! the daemon's own protocol functions ([`crate::shardkv::migration`]).

use super::{gid_of, parse_server_name, Answer, CallerId, DriverCall, ShardWorld};
use crate::ctrler::CtrlerCommand;
use crate::rsm::StateMachine;
use crate::shardkv::migration::{self, Reply, Request};
use crate::shardkv::{Duty, ShardCommand, ShardKv};
use crate::sim::group::{ClientRequest, ReplyResult};

impl ShardWorld {
    pub(super) fn call(&mut self, gi: usize, server: usize, duty: Duty) -> u64 {
        self.next_call += 1;
        let incarnation = self.groups[gi].raft.hosts[server].incarnation;
        self.calls.insert(
            self.next_call,
            DriverCall {
                gi,
                server,
                incarnation,
                duty,
            },
        );
        self.next_call
    }

    pub(super) fn caller_of(&self, gi: usize, server: usize) -> CallerId {
        gi * self.options.servers + server
    }

    /// Send `request` to every server named (only the leader will act on it).
    pub(super) fn broadcast(
        &mut self,
        from: (usize, usize),
        servers: &[String],
        duty: &Duty,
        request: ClientRequest<ShardKv>,
    ) {
        for name in servers {
            if let Some(to) = parse_server_name(name) {
                let id = self.call(from.0, from.1, duty.clone());
                let caller = self.caller_of(from.0, from.1);
                self.send_request(caller, id, to, request.clone());
            }
        }
    }

    /// Propose `command` in another group's log, as the old owner's transfer service does for a
    /// request: internal proposals are matched by (0, seq), so a fresh seq for each.
    fn broadcast_internal(
        &mut self,
        from: (usize, usize),
        servers: &[String],
        duty: &Duty,
        command: ShardCommand,
    ) {
        let seq = (self.next_call << 1) | 1;
        let request = ClientRequest::Mutate {
            client: 0,
            seq,
            command,
        };
        self.broadcast(from, servers, duty, request)
    }

    /// What the daemon's driver does in one round, over the simulated network: each duty's request
    /// ([`migration::request`]) goes out, and [`Self::on_driver_answer`] turns the answers into
    /// proposals with the same functions the daemon uses.
    pub(super) fn do_duties(&mut self, gi: usize, server: usize) {
        let Some(machine) = self.groups[gi].machine(server) else {
            return;
        };
        if !self.groups[gi].is_leader(server) {
            return;
        }
        for duty in machine.duties() {
            match migration::request(&duty) {
                Request::Config { num } => {
                    // The daemon's driver reports each configuration reached; the controller is one
                    // object here, and keeps as few configurations as it may, so that groups that
                    // join late or left long ago take the jumps the daemons would.
                    let report = CtrlerCommand::Progress {
                        gid: gid_of(gi),
                        num: num - 1,
                        keep: 1,
                    };
                    if let Err(e) = self.ctrler.apply(report) {
                        self.fail(format!("progress report refused: {e}"));
                    }
                    let id = self.call(gi, server, duty);
                    let caller = self.caller_of(gi, server);
                    self.send_ctrler_query(caller, id, Some(num));
                }
                Request::History { shard, before } => {
                    // The controller is one linearizable object here: read its history directly.
                    let mut read = Vec::new();
                    while let Some(num) = migration::next_in_history(shard, before, &read) {
                        match self.ctrler.config(num) {
                            Some(config) => read.push(config.clone()),
                            None => self.fail(format!("controller has no configuration {num}")),
                        }
                    }
                    self.answered(gi, server, &duty, migration::Answer::History(read));
                }
                // The caller's gid is what the daemon reads from the certificate: the simulated
                // groups run with the ownership checks on.
                Request::Pull { from, request } => {
                    let command = migration::serve_pull(&request, Some(gid_of(gi)));
                    self.broadcast_internal((gi, server), &from.servers, &duty, command)
                }
                Request::Delete { to, request } => {
                    let command = migration::delete_command(&request, Some(gid_of(gi)));
                    self.broadcast_internal((gi, server), &to.servers, &duty, command)
                }
            }
        }
    }

    /// Propose what `answer` to `duty` calls for, if it fits the group's state now.
    pub(super) fn answered(
        &mut self,
        gi: usize,
        server: usize,
        duty: &Duty,
        answer: migration::Answer,
    ) {
        let Some(machine) = self.groups[gi].machine(server) else {
            return;
        };
        if let Ok(command) = migration::command(machine, duty, answer) {
            self.propose(gi, server, command);
        }
    }

    pub(super) fn propose(&mut self, gi: usize, server: usize, command: ShardCommand) {
        let replies = self.groups[gi].propose(&mut self.clock, server, &command);
        self.deliver_replies(gi, replies.map(|(_, replies)| replies));
    }

    pub(super) fn on_driver_answer(&mut self, call: DriverCall, answer: Answer) {
        let DriverCall {
            gi,
            server,
            incarnation,
            duty,
        } = call;
        if self.groups[gi].raft.hosts[server].incarnation != incarnation {
            return;
        }
        let answer = match (&duty, answer) {
            (Duty::FetchConfig { .. }, Answer::Config(config)) => migration::Answer::Config(config),
            (Duty::FetchConfig { .. }, Answer::Compacted(config)) => {
                migration::Answer::Compacted(config)
            }
            (Duty::Pull { .. }, Answer::Server(ReplyResult::Done(output))) => {
                match migration::pull_reply(output) {
                    Ok(Reply::Ok(page)) => migration::Answer::Page(page),
                    Ok(Reply::NotReady) => return,
                    Ok(Reply::NotOwner { owner }) => self.fail(format!(
                        "group {} was refused {duty:?}: the shard belongs to {owner}",
                        gid_of(gi)
                    )),
                    Err(e) => self.fail(e),
                }
            }
            (Duty::Delete { .. }, Answer::Server(ReplyResult::Done(output))) => {
                match migration::delete_reply(output) {
                    Ok(Reply::Ok(())) => migration::Answer::Deleted,
                    Ok(Reply::NotReady) => return,
                    Ok(Reply::NotOwner { owner }) => self.fail(format!(
                        "group {} was refused {duty:?}: the shard belongs to {owner}",
                        gid_of(gi)
                    )),
                    Err(e) => self.fail(e),
                }
            }
            _ => return, // a wrong leader, or nothing to act on
        };
        self.answered(gi, server, &duty, answer);
    }
}
