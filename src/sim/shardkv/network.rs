//! How requests, answers and events of the sharded world travel: 6.824's fault model between clerks,
//! groups and the controller, and the dispatch of each event to the group, clerk or driver it is for.

use super::{Answer, AnswerBox, Caller, CallerId, ShardEvent, ShardWorld, DUTY_INTERVAL_MS};
use crate::shardkv::{ShardKv, ShardOutput};
use crate::sim::group::{ClientRequest, Replies};

impl ShardWorld {
    pub(super) fn send_request(
        &mut self,
        from: CallerId,
        id: u64,
        (gi, server): (usize, usize),
        request: ClientRequest<ShardKv>,
    ) {
        self.rpcs += 1;
        let Some(group) = self.groups.get(gi).filter(|g| server < g.len()) else {
            return;
        };
        let to_incarnation = group.raft.hosts[server].incarnation;
        self.transmit(
            true,
            ShardEvent::Request {
                gi,
                server,
                to_incarnation,
                from,
                id,
                request: Box::new(request),
            },
        );
    }

    /// Hand `event` to the network: it happens after the fault model's delay for a request (`true`) or
    /// an answer, or never if the network loses it.
    fn transmit(&mut self, request: bool, event: ShardEvent) {
        if let Some(delay) = self.net.fate(&mut self.net_rng, request) {
            self.clock.schedule(self.clock.now() + delay, event);
        }
    }

    pub(super) fn send_ctrler_query(&mut self, from: CallerId, id: u64, num: Option<u64>) {
        self.rpcs += 1;
        self.transmit(true, ShardEvent::CtrlerQuery { from, id, num });
    }

    pub(super) fn send_answer(&mut self, to: CallerId, id: u64, answer: Answer) {
        self.transmit(
            false,
            ShardEvent::Answer {
                to,
                id,
                answer: Box::new(AnswerBox(answer)),
            },
        );
    }

    pub(super) fn deliver_replies(
        &mut self,
        gi: usize,
        replies: Result<Replies<ShardOutput>, String>,
    ) {
        match replies {
            Ok(replies) => {
                for (_, (to, id), result) in replies {
                    self.send_answer(to, id, Answer::Server(result));
                }
            }
            Err(e) => self.fail(format!("group {gi}: {e}")),
        }
    }

    pub(super) fn on_event(&mut self, event: ShardEvent) {
        match event {
            ShardEvent::Raft(event) => {
                let gi = event.group();
                let replies = self.groups[gi].handle_raft(&mut self.clock, event);
                self.deliver_replies(gi, replies);
            }
            ShardEvent::Request {
                gi,
                server,
                to_incarnation,
                from,
                id,
                request,
            } => {
                if self.groups[gi].raft.hosts[server].incarnation == to_incarnation {
                    let replies = self.groups[gi].handle_request(
                        &mut self.clock,
                        server,
                        (from, id),
                        *request,
                    );
                    self.deliver_replies(gi, replies);
                }
            }
            ShardEvent::CtrlerQuery { from, id, num } => {
                let answer = match self.ctrler.config_or_latest(num) {
                    Ok(config) => Answer::Config(config.clone()),
                    // The oldest configuration kept is always there.
                    Err(oldest) => match self.ctrler.config(oldest) {
                        Some(config) => Answer::Compacted(config.clone()),
                        None => Answer::Config(self.ctrler.latest().clone()),
                    },
                };
                self.send_answer(from, id, answer);
            }
            ShardEvent::Answer { to, id, answer } => match self.callers.get(to).copied() {
                Some(Caller::Clerk(inbox)) => self.inboxes[inbox].push_back((id, answer.0)),
                Some(Caller::Server { .. }) => {
                    if let Some(call) = self.calls.remove(&id) {
                        self.on_driver_answer(call, answer.0);
                    }
                }
                None => {}
            },
            ShardEvent::Duties {
                gi,
                server,
                incarnation,
            } => {
                if self.groups[gi].raft.hosts[server].incarnation != incarnation
                    || !self.groups[gi].is_running(server)
                {
                    return;
                }
                // Calls older than a few rounds will not be answered any more (lost, or their server
                // restarted): forget them.
                let horizon = self.next_call.saturating_sub(10_000);
                self.calls.retain(|&id, _| id > horizon);
                self.do_duties(gi, server);
                self.clock.schedule(
                    self.clock.now() + DUTY_INTERVAL_MS,
                    ShardEvent::Duties {
                        gi,
                        server,
                        incarnation,
                    },
                );
            }
        }
    }
}
