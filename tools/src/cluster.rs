//! `strait cluster up|down`: a local multi-IDC cluster of daemons (child
//! processes running `strait node`) on 127.9.x.y, with every cross-IDC QUIC connection
//! routed through one DCI emulator: a relay in front of every node, one emulated link per
//! IDC pair and direction shared by all of them; the daemons share each link's budget
//! through its allocator (`[dci.shares]`); each daemon repairs the replicas lost with a
//! node (`[repair]`). Everything lives in one work directory: topology, certificates,
//! node configurations, stores, logs and the list of processes started, so that `down`
//! stops exactly those.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strait::transport::{CertAuthority, PeerRole};

/// Shape of the local cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of IDCs (1..=9).
    pub idcs: usize,
    /// Racks per IDC.
    pub racks: usize,
    /// Nodes per rack.
    pub nodes_per_rack: usize,
    /// DCI budget per direction, bytes/s (also the emulator's rate cap).
    pub dci_rate: u64,
    /// One-way DCI delay.
    pub dci_delay: Duration,
}

const STATE: &str = "cluster.pids";

fn idc_name(i: usize) -> String {
    format!("idc-{}", (b'a' + i as u8) as char)
}

/// A node of the generated cluster.
#[derive(Debug, Clone)]
pub struct NodePlan {
    /// Name.
    pub name: String,
    /// IDC index.
    pub idc: usize,
    /// Its strait address.
    pub addr: SocketAddr,
    /// Where other IDCs reach it (the emulator in front of it).
    pub dci_addr: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
    /// Whether it is a client identity (no daemon).
    pub client: bool,
}

/// The nodes of a cluster of this shape, plus one client identity per IDC.
pub fn plan(spec: &ClusterSpec) -> Vec<NodePlan> {
    let mut out = Vec::new();
    for i in 0..spec.idcs {
        let letter = (b'a' + i as u8) as char;
        for n in 0..spec.racks * spec.nodes_per_rack {
            let h = n as u8 + 1;
            out.push(NodePlan {
                name: format!("{letter}{}", n + 1),
                idc: i,
                addr: SocketAddr::from(([127, 9, i as u8, h], 7100)),
                dci_addr: SocketAddr::from(([127, 9, 100 + i as u8, h], 7100)),
                metrics: SocketAddr::from(([127, 9, i as u8, h], 9100)),
                client: false,
            });
        }
        out.push(NodePlan {
            name: format!("client-{letter}"),
            idc: i,
            addr: SocketAddr::from(([127, 9, i as u8, 200], 7100)),
            dci_addr: SocketAddr::from(([127, 9, 100 + i as u8, 200], 7100)),
            metrics: SocketAddr::from(([127, 9, i as u8, 200], 9100)),
            client: true,
        });
    }
    out
}

fn topology_toml(spec: &ClusterSpec, nodes: &[NodePlan]) -> String {
    let mut t = String::new();
    for i in 0..spec.idcs {
        let _ = writeln!(t, "[[idc]]\nname = \"{}\"\n", idc_name(i));
    }
    for n in nodes {
        let rack = if n.client {
            "clients".to_string()
        } else {
            let idx: usize = n.name[1..].parse().unwrap_or(1) - 1;
            format!("rack-{}", idx / spec.nodes_per_rack + 1)
        };
        let _ = writeln!(
            t,
            "[[node]]\nname = \"{}\"\nlocation = \"/{}/{rack}\"\naddr = \"{}\"\ndci_addr = \"{}\"\ncapacity = \"{}\"\n",
            n.name,
            idc_name(n.idc),
            n.addr,
            n.dci_addr,
            // A client identity stores nothing.
            if n.client { "0" } else { "1TiB" }
        );
    }
    for i in 0..spec.idcs {
        for j in i + 1..spec.idcs {
            let _ = writeln!(
                t,
                "[[dci]]\nbetween = [\"{}\", \"{}\"]\nbudget = {}\nrtt = \"{}us\"\n",
                idc_name(i),
                idc_name(j),
                spec.dci_rate,
                (spec.dci_delay * 2).as_micros()
            );
        }
    }
    t
}

fn node_toml(n: &NodePlan) -> String {
    format!(
        "name = \"{name}\"\ntopology = \"topology.toml\"\nstore_dir = \"data/{name}\"\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n\
         [dci.shares]\n\
         [replication]\nlog_dir = \"data/{name}-log\"\npolicy = \"warn\"\n\
         [repair]\nlog_dir = \"data/{name}-repair\"\n\
         [metrics]\naddr = \"{metrics}\"\n",
        name = n.name,
        metrics = n.metrics
    )
}

/// A bounded `GET path` against a daemon's metrics endpoint; the whole response.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

/// The `/metrics` text of daemon `name` of the cluster in `dir` (its address from its
/// configuration file); `None` when it does not answer.
pub fn metrics(dir: &Path, name: &str) -> Option<String> {
    let conf = std::fs::read_to_string(dir.join(format!("{name}.toml"))).ok()?;
    let addr = conf
        .split("[metrics]")
        .nth(1)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("addr = "))?
        .trim_matches('"')
        .parse()
        .ok()?;
    let r = http_get(addr, "/metrics")?;
    r.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// The sum of the samples of metric `name` whose labels contain `label` in a
/// Prometheus or OpenMetrics text exposition (`name{…} v` or `name v`).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether the daemon at `addr` is process `pid` and healthy (another process holding
/// the address, e.g. a second cluster on the same addresses, does not count).
fn healthy(addr: SocketAddr, pid: u32) -> bool {
    http_get(addr, "/health").is_some_and(|r| {
        r.starts_with("HTTP/1.1 200") && r.trim_end().ends_with(&format!("ok pid {pid}"))
    })
}

/// Generates everything in `dir`, starts the emulators and daemons, waits until every
/// daemon answers `/health`. Returns a summary for the operator.
pub fn up(dir: &Path, spec: &ClusterSpec) -> Result<String, String> {
    if !(1..=9).contains(&spec.idcs)
        || spec.racks == 0
        || spec.nodes_per_rack == 0
        || spec.racks * spec.nodes_per_rack > 99
    {
        return Err("need 1..=9 idcs and 1..=99 nodes per idc".into());
    }
    if dir.join(STATE).exists() {
        return Err(format!(
            "a cluster is already up in {} (run `strait cluster down` first)",
            dir.display()
        ));
    }
    let nodes = plan(spec);
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("topology.toml"), topology_toml(spec, &nodes))
        .map_err(|e| e.to_string())?;
    // Node and client identities in certs/ (what daemons and clients read); the CA key
    // apart from them.
    CertAuthority::generate("strait local cluster CA")
        .and_then(|ca| {
            ca.write_files_as(
                &dir.join("certs"),
                nodes.iter().map(|n| {
                    let role = if n.client {
                        PeerRole::Client
                    } else {
                        PeerRole::Node
                    };
                    (n.name.as_str(), role)
                }),
            )?;
            ca.write_ca_key(&dir.join("ca").join("ca.key"))
        })
        .map_err(|e| e.to_string())?;
    for n in &nodes {
        std::fs::write(dir.join(format!("{}.toml", n.name)), node_toml(n))
            .map_err(|e| e.to_string())?;
    }
    // The daemons are this binary's `node` command: nothing else needs building.
    let strait = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut pids = Vec::new();
    let spawn = |cmd: &mut Command, log: &str| -> Result<u32, String> {
        let out = std::fs::File::create(dir.join("logs").join(log)).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{log}: {e}"))?;
        Ok(child.id())
    };
    let result = (|| -> Result<(), String> {
        // One emulator for the whole cluster: a relay in front of every node, and one
        // link per IDC pair and direction that all of them share.
        let mut args: Vec<String> = vec![
            "dci-emu".into(),
            "--rate".into(),
            spec.dci_rate.to_string(),
            "--delay".into(),
            format!("{}us", spec.dci_delay.as_micros()),
        ];
        for n in &nodes {
            args.push("--relay".into());
            args.push(format!("{},{},{}", n.dci_addr, n.addr, idc_name(n.idc)));
            args.push("--peer".into());
            args.push(format!("{},{}", n.addr.ip(), idc_name(n.idc)));
        }
        let pid = spawn(
            Command::new(&strait).current_dir(dir).args(&args),
            "dci-emu.log",
        )?;
        pids.push((pid, "dci-emu".into()));
        for n in nodes.iter().filter(|n| !n.client) {
            let pid = spawn(
                Command::new(&strait).current_dir(dir).args([
                    "node",
                    "--config",
                    &format!("{}.toml", n.name),
                ]),
                &format!("{}.log", n.name),
            )?;
            pids.push((pid, n.name.clone()));
        }
        Ok(())
    })();
    let state: String = pids.iter().map(|(p, n)| format!("{p} {n}\n")).collect();
    std::fs::write(dir.join(STATE), state).map_err(|e| e.to_string())?;
    result?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter().filter(|n| !n.client) {
        let pid = pids
            .iter()
            .find(|(_, name)| name == &n.name)
            .map(|(p, _)| *p)
            .unwrap_or(0);
        // Healthy means *our* process answers: one that died (address taken by a stray
        // process, bad config) is an error, not a success reported by someone else.
        while !healthy(n.metrics, pid) || !alive(pid) {
            if !alive(pid) {
                return Err(format!(
                    "{} exited at start (address in use?); see {}; run `strait cluster down --dir {}`",
                    n.name,
                    dir.join("logs").join(format!("{}.log", n.name)).display(),
                    dir.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} is not healthy after 30 s; see {}",
                    n.name,
                    dir.join("logs").join(format!("{}.log", n.name)).display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut s = format!(
        "cluster up in {}: {} idcs x {} racks x {} nodes, DCI {} per IDC pair and direction, +{:?} one way (one dci-emu, a relay in front of every node), cluster-wide DCI shares\n",
        dir.display(),
        spec.idcs,
        spec.racks,
        spec.nodes_per_rack,
        strait::units::fmt_rate(spec.dci_rate),
        spec.dci_delay
    );
    for n in nodes.iter().filter(|n| !n.client) {
        let _ = writeln!(
            s,
            "  {:<4} {}  {}  metrics http://{}/metrics",
            n.name,
            idc_name(n.idc),
            n.addr,
            n.metrics
        );
    }
    let _ = writeln!(
        s,
        "{} processes; stop them with `strait cluster down --dir {}`",
        pids.len(),
        dir.display()
    );
    Ok(s)
}

/// Stops exactly the processes `up` started in `dir` (SIGTERM, then waits, bounded).
pub fn down(dir: &Path) -> Result<String, String> {
    let path = dir.join(STATE);
    let pids: Vec<u32> = processes(dir)?.into_iter().map(|(p, _)| p).collect();
    let left = terminate(&pids);
    std::fs::remove_file(&path).map_err(|e| e.to_string())?;
    if left.is_empty() {
        Ok(format!("stopped {} processes", pids.len()))
    } else {
        Err(format!("processes still running after SIGTERM: {left:?}"))
    }
}

/// The processes `up` (and [`restart_node`]) started that still run: pid and name. A pid
/// in the state file counts only while its process works in `dir`, as every process `up`
/// starts does: the state of a cluster that died unseen (its launcher killed) lists pids
/// that may since belong to anything, which must never be signalled.
pub fn processes(dir: &Path) -> Result<Vec<(u32, String)>, String> {
    let text = std::fs::read_to_string(dir.join(STATE))
        .map_err(|e| format!("no cluster in {}: {e}", dir.display()))?;
    let here = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next().unwrap_or("").to_string()))
        })
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == here)
        })
        .collect())
}

/// SIGTERMs `pids` and waits (15 s at most); returns those still running.
pub fn terminate(pids: &[u32]) -> Vec<u32> {
    for p in pids {
        let _ = Command::new("kill")
            .args(["-TERM", &p.to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let alive = |p: &u32| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p);
    while pids.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    pids.iter().copied().filter(alive).collect()
}

/// Stops the daemons of the named nodes (they stay in the pid list: `down` skips dead
/// pids).
pub fn stop_nodes(dir: &Path, names: &[&str]) -> Result<(), String> {
    let pids: Vec<u32> = processes(dir)?
        .into_iter()
        .filter(|(_, n)| names.contains(&n.as_str()))
        .map(|(p, _)| p)
        .collect();
    let left = terminate(&pids);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still running: {left:?}"))
    }
}

/// Starts the daemon of node `name` again and waits for its `/health`.
pub fn restart_node(dir: &Path, name: &str, metrics: SocketAddr) -> Result<(), String> {
    let strait = std::env::current_exe().map_err(|e| e.to_string())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))
        .map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(&strait)
        .current_dir(dir)
        .args(["node", "--config", &format!("{name}.toml")])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(STATE))
        .map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut f, format!("{} {name}\n", child.id()).as_bytes())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy(metrics, child.id()) {
        if Instant::now() > deadline {
            return Err(format!("{name} not healthy after restart"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The pid the launcher recorded last for daemon `name`.
pub fn pid_of(dir: &std::path::Path, name: &str) -> Result<u32, String> {
    processes(dir)?
        .into_iter()
        .rev()
        .find(|(_, n)| n == name)
        .map(|(p, _)| p)
        .ok_or_else(|| format!("no process for {name}"))
}

/// Sends signal `sig` (`-9`, `-STOP`, …) to `pid`.
pub fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    if ok {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed"))
    }
}

/// Sums a metric over the daemons' `/metrics`.
pub fn scrape_sum(addrs: &[SocketAddr], name: &str) -> f64 {
    scrape_labelled(addrs, name, "")
}

/// Sums the samples of `name` whose labels contain `label` over the daemons' `/metrics`.
pub fn scrape_labelled(addrs: &[SocketAddr], name: &str, label: &str) -> f64 {
    scrape(addrs)
        .iter()
        .map(|out| metric_sum(out, name, label))
        .sum()
}

/// The `/metrics` text of each daemon that answers (one request each), for several sums
/// over one scrape.
pub fn scrape(addrs: &[SocketAddr]) -> Vec<String> {
    addrs
        .iter()
        .filter_map(|&a| http_get(a, "/metrics"))
        .collect()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_never_signals_a_pid_it_did_not_start() {
        // A state file left by a cluster that died unseen, naming a pid that now belongs
        // to someone else: this test process (it works in another directory).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE),
            format!("{} a1\n4194999 a2\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(processes(dir.path()).unwrap(), vec![]);
        assert_eq!(down(dir.path()).unwrap(), "stopped 0 processes");
        assert!(!dir.path().join(STATE).exists());
    }
}
