"""Where a benchmark ran: what a result file in bench/results/ records beside its figures so it
can be read (and repeated) later: the command line, the repository's commit and whether the
tree had uncommitted changes, the CPU's model and its flags from /proc/cpuinfo (the SIMD ones
the kernels choose between as well), the machine's core count and the start time.

Shared by bench/load.py and bench/interleave.py; standard library only."""

import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The instruction sets Tollgate's CPU kernels choose between (TOLLGATE_CPU_KERNELS).
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")


def cpuinfo(field):
    """The value of the first `field` line of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_flags():
    flags = cpuinfo("flags")
    return flags.split() if flags is not None else []


def cpu_model():
    model = cpuinfo("model name")
    return model.strip() if model is not None else platform.processor()


def git_state(root=ROOT):
    """(commit, dirty): HEAD of the repository and whether tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))


def command_line(argv):
    """The command line as a shell would take it, the values of options naming keys
    (`--api-key`, `--customer-keys`, ...) left out: a result file is committed."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("KEY")
        elif arg.startswith("--") and "key" in arg and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=KEY")
        else:
            out.append(arg)
        hide = not hide and arg.startswith("--") and "key" in arg and "=" not in arg
    return " ".join(shlex.quote(a) for a in out)


def provenance(argv=None):
    """The fields every result file starts with."""
    commit, dirty = git_state()
    flags = cpu_flags()
    return {"command": command_line(sys.argv if argv is None else argv),
            "commit": commit, "dirty": dirty, "cpu": cpu_model(),
            "cpu_simd": {f: f in flags for f in SIMD_FLAGS}, "cpu_flags": flags,
            "nproc": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "env": {k: os.environ[k] for k in ("TOLLGATE_CPU_KERNELS", "RAYON_NUM_THREADS") if k in os.environ}}
