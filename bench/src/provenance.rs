//! Where a result file's figures come from: the commit (and whether the tree had uncommitted
//! changes), the CPU and its SIMD flags, the cores, the time and the command line, written into
//! every JSON result so a figure can be traced to the machine and code that produced it.

use serde_json::{json, Value};

/// The CPU flags that decide which kernels run (AVX-512 and its extensions, AVX2, FMA, F16C).
const KERNEL_FLAGS: &[&str] = &[
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512vbmi",
];

/// The provenance of a result produced now, by this process.
pub fn provenance() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags: Vec<&str> = field("flags")
        .map(|f| {
            let present: Vec<String> = f.split_whitespace().map(str::to_string).collect();
            KERNEL_FLAGS
                .iter()
                .copied()
                .filter(|k| present.iter().any(|p| p == k))
                .collect()
        })
        .unwrap_or_default();
    let env: serde_json::Map<String, Value> = ["TOLLGATE_CPU_KERNELS", "RAYON_NUM_THREADS"]
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .map(|v| (k.to_string(), Value::String(v)))
        })
        .collect();
    json!({
        "commit": git(&["rev-parse", "HEAD"]),
        "dirty": git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        "cpu": field("model name"),
        "cpu_kernel_flags": flags,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "started": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "env": env,
    })
}

/// The trimmed output of `git args` in the current directory, when git answers.
fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
