//! `kvctl ctrler ...`: join, leave, move, servers and query against the shard controller, and how a configuration
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
    /// Group ids, and whether to force it (see [`CtrlerClerk::leave_with`]).
    Leave(Vec<Gid>, bool),
    /// Shard and group.
    Move(u64, Gid),
    /// A `GID=SERVER,...` specification: the group's whole new server list.
    Servers(String),
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

/// How a shard group's server list in the controllers changes with its Raft membership
/// (`kvctl member ... --gid G --serve SERVER`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEdit {
    /// A new voter serves at this entry (`PEER` or `PEER@CLIENT`).
    Add(String),
    /// A removed member served at this entry.
    Remove(String),
}

impl ServerEdit {
    /// The entry edited.
    pub fn entry(&self) -> &str {
        match self {
            ServerEdit::Add(entry) | ServerEdit::Remove(entry) => entry,
        }
    }

    /// `servers` after the edit (adding an entry already listed, or removing one not listed, changes
    /// nothing: a rerun after a crash is harmless).
    pub fn apply_to(&self, servers: &[String]) -> Vec<String> {
        let mut next: Vec<String> = servers.to_vec();
        match self {
            ServerEdit::Add(entry) if !next.contains(entry) => next.push(entry.clone()),
            ServerEdit::Add(_) => {}
            ServerEdit::Remove(entry) => next.retain(|s| s != entry),
        }
        next
    }
}

/// The latest configuration and group `gid`'s servers in it; an error naming the groups there are if
/// it has none.
pub async fn group_servers(
    clerk: &mut CtrlerClerk,
    gid: Gid,
) -> Result<(Config, crate::ctrler::Servers), String> {
    let latest = clerk
        .query(None)
        .await
        .map_err(|e| format!("controllers: {e}"))?;
    match latest.groups.get(&gid).cloned() {
        Some(servers) => Ok((latest, servers)),
        None => Err(format!(
            "group {gid} is not in configuration {} (groups: {:?})",
            latest.num,
            latest.groups.keys().collect::<Vec<_>>()
        )),
    }
}

/// Check, before the membership changes, that `edit` can be made to group `gid`'s list: the group
/// has joined, a removed entry is listed and is not its last.
pub async fn check_server_edit(
    clerk: &mut CtrlerClerk,
    gid: Gid,
    edit: &ServerEdit,
) -> Result<(), String> {
    crate::ctrler::addresses::validate_entry(edit.entry())?;
    let (latest, servers) = group_servers(clerk, gid).await?;
    if let ServerEdit::Add(entry) = edit {
        let peer = crate::ctrler::addresses::peer_address(entry);
        if let Some(other) = servers
            .iter()
            .find(|s| *s != entry && crate::ctrler::addresses::peer_address(s) == peer)
        {
            return Err(format!(
                "group {gid} already lists {other:?} for peer address {peer}; remove it first or set the list with `kvctl ctrler servers`"
            ));
        }
        if !servers.contains(entry) && servers.len() >= crate::ctrler::MAX_SERVERS_PER_GROUP {
            return Err(format!(
                "group {gid} already has {} servers, the most a group may have",
                servers.len()
            ));
        }
    }
    if let ServerEdit::Remove(entry) = edit {
        if !servers.contains(entry) {
            return Err(format!(
                "--serve {entry:?} is not one of group {gid}'s servers in configuration {} ({})",
                latest.num,
                servers.join(",")
            ));
        }
        if servers.len() == 1 {
            return Err(format!(
                "{entry:?} is group {gid}'s only server in the controllers' configuration"
            ));
        }
    }
    Ok(())
}

/// Make the controllers hand out group `gid`'s servers with `edit` made: read the latest list, send
/// the edited one on condition that the list is still the one read, and start again if another edit
/// came in between (so concurrent edits are all kept); returns the configuration that says so.
pub async fn edit_servers(
    clerk: &mut CtrlerClerk,
    gid: Gid,
    edit: &ServerEdit,
) -> Result<Config, String> {
    const ATTEMPTS: usize = 10;
    for _ in 0..ATTEMPTS {
        let (_, servers) = group_servers(clerk, gid).await?;
        match clerk
            .set_servers(gid, edit.apply_to(&servers), Some(servers.to_vec()))
            .await
        {
            Err(e) if e.to_string().contains(crate::ctrler::SERVERS_CHANGED) => continue,
            result => return result.map_err(|e| format!("controllers: {e}")),
        }
    }
    Err(format!(
        "controllers: group {gid}'s servers kept changing ({ATTEMPTS} attempts)"
    ))
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
        crate::errln!("kvctl: error: {e}");
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
                        if groups.insert(gid, servers).is_some() {
                            return fail(&format!("group {gid} is named twice"));
                        }
                    }
                    Err(e) => return fail(&e),
                }
            }
            if skip_joined {
                match clerk.query(None).await {
                    Ok(latest) => {
                        groups.retain(|gid, _| !latest.groups.contains_key(gid));
                        if groups.is_empty() {
                            crate::out!("{}", render(&latest));
                            return EXIT_OK;
                        }
                    }
                    Err(e) => return fail(&e),
                }
            }
            (clerk.join(groups).await, false)
        }
        Op::Leave(gids, force) => (clerk.leave_with(gids, force).await, false),
        Op::Move(shard, gid) => (clerk.move_shard(shard, gid).await, false),
        Op::Servers(spec) => match parse_group(&spec) {
            Ok((gid, servers)) => (clerk.set_servers(gid, servers, None).await, false),
            Err(e) => return fail(&e),
        },
        Op::Query(num, json) => (clerk.query(num).await, json),
    };
    match result {
        Ok(config) if json => {
            crate::outln!("{}", to_json(&config));
            EXIT_OK
        }
        Ok(config) => {
            crate::out!("{}", render(&config));
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
    fn a_server_edit_is_idempotent_and_keeps_the_order() {
        let list = vec!["a".to_string(), "b".to_string()];
        let add = ServerEdit::Add("c".into());
        assert_eq!(add.apply_to(&list), ["a", "b", "c"]);
        assert_eq!(add.apply_to(&add.apply_to(&list)), ["a", "b", "c"]);
        let remove = ServerEdit::Remove("a".into());
        assert_eq!(remove.apply_to(&list), ["b"]);
        assert_eq!(remove.apply_to(&remove.apply_to(&list)), ["b"]);
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
