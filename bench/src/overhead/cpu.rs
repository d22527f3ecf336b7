//! CPU accounting from /proc (Linux): the gateway's CPU per request, and how busy the rest of
//! the machine was meanwhile, since a shared machine skews latency figures.

use std::time::Instant;

/// Linux's USER_HZ: the unit of CPU times in /proc.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system, all threads) of a process, from /proc (Linux).
fn process_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// CPU seconds the machine's processes ran (user and system time, as processes are charged),
/// and the CPU seconds the hypervisor stole. Interrupt and softirq time are left out: loopback
/// traffic is mostly processed there and charged to no process, so it would look like other
/// processes' work.
fn machine_busy() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = v.iter().take(3).sum();
    Some((busy / TICKS_PER_SEC, v.get(7)? / TICKS_PER_SEC))
}

#[derive(Clone, Copy)]
pub struct CpuSnapshot {
    at: Instant,
    gateway: Option<f64>,
    own: Option<f64>,
    machine: Option<(f64, f64)>,
}

impl CpuSnapshot {
    /// Now, the gateway's CPU being that of every process in `gateway_pids` (its replicas).
    pub fn take(gateway_pids: &[u32]) -> Self {
        Self {
            at: Instant::now(),
            gateway: gateway_pids
                .iter()
                .map(|p| process_cpu(&p.to_string()))
                .sum(),
            own: process_cpu("self"),
            machine: machine_busy(),
        }
    }
}

/// CPU used between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// Gateway CPU seconds.
    pub gateway: Option<f64>,
    /// CPU seconds of every other process, as a share of one core (100% = one core busy).
    pub others_pct: Option<f64>,
    /// CPU time the hypervisor took from this machine, likewise.
    pub steal_pct: Option<f64>,
    /// CPU of this process (load generator and upstream), likewise.
    pub bench_pct: Option<f64>,
}

pub fn cpu_between(a: CpuSnapshot, b: CpuSnapshot) -> CpuUse {
    let d = |x: Option<f64>, y: Option<f64>| Some(y? - x?);
    let gateway = d(a.gateway, b.gateway);
    let others = (|| {
        let busy = d(a.machine.map(|m| m.0), b.machine.map(|m| m.0))?;
        let own = d(a.own, b.own)?;
        Some((busy - own - gateway?).max(0.0))
    })();
    let steal = d(a.machine.map(|m| m.1), b.machine.map(|m| m.1));
    let wall = (b.at - a.at).as_secs_f64();
    CpuUse {
        gateway,
        others_pct: others.map(|o| 100.0 * o / wall),
        steal_pct: steal.map(|s| 100.0 * s / wall),
        bench_pct: d(a.own, b.own).map(|o| 100.0 * o / wall),
    }
}
