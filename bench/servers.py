"""What bench/load.py knows of the servers it measures: what each says about itself (its
/models and, for llama.cpp's server, /props), how many sequences each may run at once (Tollgate's
engine: `max_running`; llama.cpp's: its slots), and a server process's peak RSS while it runs.

Shared by bench/load.py and bench/spec.py."""

import sys
import threading
import time

import httpx

# What Tollgate's engine runs at once (EngineConfig::max_running; not a setting, not reported).
TOLLGATE_SLOTS = 32


class RssSampler(threading.Thread):
    """Samples VmRSS of a process (and its children are ignored) every 50 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.05)


def slots_of(told, props, told_from="told"):
    """(slots, where from, warning or None): what a server may run at once, as read from its
    /props (llama.cpp's `total_slots`) or as told (`told_from` says by what)."""
    read = (props or {}).get("total_slots")
    if read is not None and told is not None and read != told:
        return read, "/props total_slots", f"told {told} slots, but its /props says {read}"
    if read is not None:
        return read, "/props total_slots", None
    if told is not None:
        return told, told_from, None
    return None, "unknown", "slots unknown: pass --peer-slots (llama.cpp's --parallel)"


def probe(server):
    """What a server says about itself: its /models and, for llama.cpp's server, /props."""
    headers = {"Authorization": f"Bearer {server['api_key']}"} if server["api_key"] else {}
    out = {}
    root = server["base_url"].rstrip("/").removesuffix("/v1")
    for name, url in (("models", server["base_url"].rstrip("/") + "/models"), ("props", root + "/props")):
        try:
            r = httpx.get(url, headers=headers, timeout=10)
            out[name] = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            out[name] = None
    props = out["props"] or {}
    out["props"] = {k: props[k] for k in ("total_slots", "build_info", "model_path") if k in props} or None
    if "default_generation_settings" in props:
        out["props"]["n_ctx"] = (props["default_generation_settings"] or {}).get("n_ctx")
    return out


def describe_servers(args):
    """The servers of a levels run, with what they say about themselves and their slots; prints
    the slots and a warning where the two servers may not run as many sequences at once."""
    servers = [{"label": args.label, "base_url": args.base_url, "model": args.model, "api_key": args.api_key,
                "pid": args.pid, "version": args.version, "settings": args.settings,
                "slots_told": (args.slots, "--slots; Tollgate's engine: max_running")}]
    if args.peer_base_url:
        servers.append({"label": args.peer_label, "base_url": args.peer_base_url,
                        "model": args.peer_model or args.model,
                        "api_key": args.peer_api_key if args.peer_api_key is not None else args.api_key,
                        "pid": args.peer_pid, "version": args.peer_version, "settings": args.peer_settings,
                        "slots_told": (args.peer_slots, "--peer-slots")})
    for i, s in enumerate(servers):
        s["index"] = i
        s.update(probe(s))
        told, source = s.pop("slots_told")
        s["slots"], s["slots_from"], warning = slots_of(told, s["props"], source)
        if not s["version"] and s["props"]:
            s["version"] = s["props"].get("build_info")
        print(f"{s['label']}: {s['slots'] or 'unknown'} slots ({s['slots_from']}), version {s['version'] or 'not given'}, "
              f"settings: {s['settings'] or 'not given'}", flush=True)
        if warning:
            print(f"warning: {s['label']}: {warning}", file=sys.stderr, flush=True)
    if len(servers) == 2 and servers[0]["slots"] != servers[1]["slots"]:
        print(f"warning: {servers[0]['label']} may run {servers[0]['slots']} sequences at once, "
              f"{servers[1]['label']} {servers[1]['slots'] or 'unknown'}: give the peer as many (llama.cpp: --parallel "
              f"{servers[0]['slots']})", file=sys.stderr, flush=True)
    return servers
