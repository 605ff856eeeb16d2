//! `chaos`: Jepsen-style fault injection against a real ds824 cluster. The logic lives in
//! `ds824::chaos`; this file parses flags, handles Ctrl-C and maps outcomes to exit statuses.

use clap::{Parser, Subcommand};
use ds824::chaos::{self, CleanArgs, RunArgs};
use std::process::ExitCode;

/// Run a ds824 cluster under faults and check what its clients saw.
///
/// `chaos run` starts a cluster (`--target local`: kvd processes in network namespaces this run
/// creates, with mutual TLS), drives a workload (register, append, bank) with in-process clients while
/// a seeded nemesis kills, pauses, partitions, drops packets, restarts the whole cluster and (sharded
/// store) moves shards between groups, heals everything, and checks the recorded history for
/// linearizability (per key) and the workload's own invariant; availability is reported overall and
/// per kind of fault. Everything the run creates is named chaos-<pid> and removed at the end, also on
/// Ctrl-C or an error.
///
/// Exit status: 0 every check held; 1 a violation (linearizability or an invariant); 2 the run could
/// not be made (bad flags, not root, no leader, interrupted, target not implemented), or every check
/// held but the summary could not be written; 3 the checker could not decide within
/// --check-budget-secs.
///
/// Example: sudo chaos run --target local --workload append --nemesis kill,pause,partition,loss
///   --time 120s --rate 200 --clients 10 --seed 42 --out runs/append-42
#[derive(Parser)]
#[command(name = "chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a cluster, run a workload under faults, check the history. Writes to --out:
    /// history.jsonl (kvctl check's format), nemesis.jsonl (faults on the same clock), summary.json,
    /// check.txt, report.html, certs/, data/, logs/.
    Run(Box<RunArgs>),
    /// Remove what a run left behind if it was itself killed (namespaces and the processes in them,
    /// its bridge and firewall rule). Touches nothing that does not carry the tag.
    Clean(CleanArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ds824::daemon::init_logging();
    let runtime = match ds824::daemon::runtime("chaos") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let code = match cli.command {
        Command::Clean(args) => {
            let problems = chaos::cluster::netns::remove_tag(&args.tag);
            for problem in &problems {
                ds824::errln!("chaos: {problem}");
            }
            match problems.is_empty() {
                true => chaos::EXIT_VALID,
                false => chaos::EXIT_ERROR,
            }
        }
        Command::Run(args) => runtime.block_on(async {
            let mut run = Box::pin(chaos::run(*args));
            let finished = tokio::select! {
                result = &mut run => Some(result),
                () = ds824::daemon::shutdown_signal() => None,
            };
            match finished {
                Some(Ok(summary)) => {
                    ds824::outln!("{}", summary.render());
                    summary.exit_code()
                }
                Some(Err(e)) => {
                    ds824::errln!("chaos: error: {e}");
                    chaos::EXIT_ERROR
                }
                None => {
                    // Dropping the run drops the cluster, whose guard kills the servers and removes
                    // the namespaces, the bridge and the rule before this returns.
                    drop(run);
                    ds824::errln!("chaos: interrupted; the cluster and every fault were removed");
                    chaos::EXIT_ERROR
                }
            }
        }),
    };
    // A checker still running on a blocking thread (interrupted run) must not hold the exit.
    runtime.shutdown_background();
    ExitCode::from(ds824::daemon::exit_status("chaos", code, chaos::EXIT_ERROR))
}
