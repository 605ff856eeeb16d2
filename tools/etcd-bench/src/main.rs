//! `etcd-bench`: `kvctl bench`'s closed loop (the same [`ds824::kvctl::bench`] code, flags and report)
//! against an etcd cluster, so `benches/compare-etcd.sh` compares the stores and not two load
//! generators. Each simulated client is its own etcd client with its own connections; gets are etcd's
//! default linearizable reads (a ReadIndex round), or serializable ones with `--serializable`.

/// The allocator kvctl uses (see its Cargo.toml entry).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use ds824::kvctl::bench::{self, BenchClient, BenchStore, ClientError, LoadArgs};
use etcd_client::{Client, GetOptions};
use std::process::ExitCode;

/// Measure etcd with kvctl bench's load.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// Serve gets from any member's local state (etcd's serializable reads) instead of linearizable
    /// ones.
    #[arg(long)]
    serializable: bool,
    #[command(flatten)]
    load: LoadArgs,
}

/// Opens one etcd client per simulated client.
struct Etcd {
    endpoints: Vec<String>,
    serializable: bool,
}

/// One simulated client: its own etcd client.
struct EtcdClient {
    client: Client,
    serializable: bool,
}

impl BenchStore for Etcd {
    type Client = EtcdClient;

    async fn connect(&self) -> Result<EtcdClient, ClientError> {
        Ok(EtcdClient {
            client: Client::connect(&self.endpoints, None).await?,
            serializable: self.serializable,
        })
    }
}

impl BenchClient for EtcdClient {
    async fn get(&mut self, key: &str) -> Result<(), ClientError> {
        let options = self
            .serializable
            .then(|| GetOptions::new().with_serializable());
        self.client.get(key, options).await?;
        Ok(())
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<(), ClientError> {
        self.client.put(key, value, None).await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let load = match cli.load.load() {
        Ok(load) => load,
        Err(e) => {
            eprintln!("etcd-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let store = Etcd {
        endpoints: cli.endpoints,
        serializable: cli.serializable,
    };
    let result = match bench::fill(&store, &load).await {
        Ok(()) => bench::measure_showing_progress(&store, &load).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(report) if cli.load.json => {
            println!("{}", report.to_json());
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("etcd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
