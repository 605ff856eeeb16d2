//! `chaos`: a Jepsen-style harness that runs the real daemons, breaks them from outside and judges what
//! clients saw.
//!
//! Why it exists: the simulator (`sim`) proves the protocol under 6.824's fault model, but only real
//! processes, real sockets, real disks and real signals show what operators will meet — a `kvd` killed
//! mid-fsync, a leader frozen by SIGSTOP while its lease runs out, packets dropped by the kernel. This
//! module drives a real cluster, injects those faults on a seeded schedule, records every client
//! operation on one monotonic clock and hands the history to the linearizability checker ([`crate::check`]).
//!
//! One run, in order ([`run::run`]):
//! 1. **cluster** ([`cluster`]): a [`cluster::Cluster`] is a target the harness can start, fault and tear
//!    down. [`cluster::local`] builds one on this machine: a bridge and one network namespace per node
//!    ([`cluster::netns`]), `kvd kv` processes inside them with mutual-TLS certificates issued for the
//!    run; clients stay on the host side of the bridge.
//! 2. **workload** ([`workload`]): `--clients` in-process clerks issue `register` (get/put/cas),
//!    `append` (unique appends and reads) or `bank` (transfers between the accounts of a ledger by
//!    cas, [`bank`]) operations at `--rate` ops/s in total; each completed operation is recorded as
//!    `ok`, `fail` (definitely not applied) or `info` (unknown: timed out).
//! 3. **nemesis** ([`nemesis`]): a schedule computed from `--seed` alternates quiet and faulty windows
//!    (kill, pause, partition, loss, restart-all, and shard moves through the controllers with
//!    `reconfigure`); every fault is healed at its window's end and again, all at once, when the
//!    faulty phase is over.
//! 4. **recovery**: with everything healed the workload goes on for `--recovery-time`; the `append`
//!    and `bank` workloads then read every key they used.
//! 5. **verdict** ([`verdict`]): the checker per key within `--check-budget-secs`, the workload's own
//!    invariant, the recovery invariant, availability overall and per kind of fault; a summary on
//!    stdout and in `DIR/summary.json`.
//!
//! Files a run writes to `--out DIR` ([`history`]): `history.jsonl` (the checker's format, one
//! operation per line), `nemesis.jsonl` (fault start/stop events on the same clock), `summary.json`,
//! `check.txt` (the checker's report), `report.html` ([`report`]: one self-contained page with the
//! verdict, throughput and latency over time with the fault windows shaded, availability, and a
//! violation drawn as a timeline), `certs/`, `data/node-N/`, `logs/node-N.log`.
//!
//! Nothing outside the run is ever touched: every namespace, link and firewall rule the local target
//! makes carries the run's tag (`chaos-<pid>`), and teardown — at the end, on Ctrl-C, on an error or a
//! panic (a drop guard) — removes exactly those and kills exactly the processes inside them.
//! `chaos clean --tag` does the same for a run that was itself SIGKILLed.

pub mod args;
pub mod bank;
pub mod cluster;
pub mod cmd;
pub mod history;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod run;
pub mod verdict;
pub mod workload;

pub use args::{CleanArgs, RunArgs, Target};
pub use run::{run, RunError};
pub use verdict::Summary;

/// Exit status: the run was made and every check held.
pub const EXIT_VALID: u8 = 0;
/// Exit status: the checker found a linearizability violation or an invariant failed.
pub const EXIT_INVALID: u8 = 1;
/// Exit status: the run could not be made (bad flags, not root, a cluster that never elected a leader,
/// an interrupted run, a target not implemented).
pub const EXIT_ERROR: u8 = 2;
/// Exit status: no violation found, but the checker could not decide within its budget.
pub const EXIT_UNKNOWN: u8 = 3;
