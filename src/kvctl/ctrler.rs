//! `kvctl ctrler ...`: join, leave, move and query against the shard controller, and how a configuration
//! is shown to an operator.

use super::{EXIT_ERROR, EXIT_OK};
use crate::ctrler::{Config, CtrlerClerk, Gid};
use crate::rsm::client::ClerkConfig;
use std::collections::BTreeMap;

/// What the operator asked for.
pub enum Op {
    /// `GID=HOST:PORT,...` specifications, and whether to leave out groups the latest configuration
    /// already has (so a provisioning job can run on every start: the controller refuses a second join
    /// of the same group).
    Join(Vec<String>, bool),
    /// Group ids.
    Leave(Vec<Gid>),
    /// Shard and group.
    Move(u64, Gid),
    /// Configuration number (latest if absent) and whether to print JSON.
    Query(Option<u64>, bool),
}

/// Parse `GID=SERVER,SERVER` into a group; a SERVER is `HOST:PORT` (its address for the other groups
/// and for clients) or `PEER@CLIENT` (the address clients outside the network use after the `@`).
pub fn parse_group(spec: &str) -> Result<(Gid, Vec<String>), String> {
    let (gid, servers) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not GID=HOST:PORT,..."))?;
    let gid: Gid = gid
        .trim()
        .parse()
        .map_err(|_| format!("{gid:?} is not a group id"))?;
    if gid == 0 {
        return Err("group id 0 is reserved".into());
    }
    let servers: Vec<String> = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if servers.is_empty() {
        return Err(format!("group {gid} names no servers"));
    }
    for server in &servers {
        crate::ctrler::addresses::validate_entry(server)
            .map_err(|e| format!("group {gid}: {e}"))?;
    }
    Ok((gid, servers))
}

/// A configuration as text: its number, the owner of each shard, and each group's servers.
pub fn render(config: &Config) -> String {
    let mut out = format!("config {}\n", config.num);
    let shards: Vec<String> = config.shards.iter().map(|g| g.to_string()).collect();
    out.push_str(&format!("shards (shard:group): {}\n", {
        let pairs: Vec<String> = shards
            .iter()
            .enumerate()
            .map(|(shard, gid)| format!("{shard}:{gid}"))
            .collect();
        pairs.join(" ")
    }));
    if config.groups.is_empty() {
        out.push_str("groups: none\n");
    }
    for (gid, servers) in &config.groups {
        let owned = config.shards.iter().filter(|g| *g == gid).count();
        out.push_str(&format!(
            "group {gid}: {owned} shards, servers {}\n",
            servers.join(",")
        ));
    }
    out
}

/// A configuration as JSON for scripts.
pub fn to_json(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "num": config.num,
        "shards": config.shards,
        "groups": config.groups,
    })
}

/// Run one controller operation; returns the exit code.
pub async fn run(ctrlers: &[String], config: ClerkConfig, op: Op) -> u8 {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("kvctl: error: {e}");
        EXIT_ERROR
    };
    if ctrlers.is_empty() {
        return fail(&"no controllers given (--ctrlers or KVCTL_CTRLERS)");
    }
    let mut clerk = match CtrlerClerk::new(ctrlers, config) {
        Ok(clerk) => clerk,
        Err(e) => return fail(&e),
    };
    let (result, json) = match op {
        Op::Join(specs, skip_joined) => {
            let mut groups = BTreeMap::new();
            for spec in &specs {
                match parse_group(spec) {
                    Ok((gid, servers)) => {
                        groups.insert(gid, servers);
                    }
                    Err(e) => return fail(&e),
                }
            }
            if skip_joined {
                match clerk.query(None).await {
                    Ok(latest) => {
                        groups.retain(|gid, _| !latest.groups.contains_key(gid));
                        if groups.is_empty() {
                            print!("{}", render(&latest));
                            return EXIT_OK;
                        }
                    }
                    Err(e) => return fail(&e),
                }
            }
            (clerk.join(groups).await, false)
        }
        Op::Leave(gids) => (clerk.leave(gids).await, false),
        Op::Move(shard, gid) => (clerk.move_shard(shard, gid).await, false),
        Op::Query(num, json) => (clerk.query(num).await, json),
    };
    match result {
        Ok(config) if json => {
            println!("{}", to_json(&config));
            EXIT_OK
        }
        Ok(config) => {
            print!("{}", render(&config));
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_and_bad_ones_are_explained() {
        assert_eq!(
            parse_group("101=a:1, b:2").expect("valid"),
            (101, vec!["a:1".to_string(), "b:2".to_string()])
        );
        assert!(parse_group("x=a:1").is_err());
        assert!(parse_group("0=a:1").is_err());
        assert!(parse_group("5=").is_err());
        assert!(parse_group("5").is_err());
    }

    #[test]
    fn a_configuration_renders_owners_and_servers() {
        let config = Config {
            num: 2,
            shards: vec![1, 1, 2],
            groups: [(1, vec!["a".to_string()]), (2, vec!["b".to_string()])]
                .into_iter()
                .collect(),
        };
        let text = render(&config);
        assert!(text.contains("config 2"), "{text}");
        assert!(text.contains("0:1 1:1 2:2"), "{text}");
        assert!(text.contains("group 1: 2 shards, servers a"), "{text}");
    }
}
