#!/usr/bin/env python3
"""Records llama.cpp's greedy tokens on the tiny models of runtime/tests/architectures.rs.

Kept out of CI (it builds llama.cpp). Steps:
  1. llama.cpp's server is built once from the llama-cpp-python 0.3.36 sdist on PyPI (the one
     scripts/fetch-vocabs.sh downloads; SHA-256 checked), outside the repository, under
     ~/.cache/tollgate/llama-build (cmake and ninja from PyPI in a venv there; `nice -n 19`).
  2. `cargo run --example arch_models` writes the test's models (qwen2, phi3, llama; the very
     bytes the test builds) and their prompts into ~/.cache/tollgate/arch-models.
  3. Each model is served by llama-server (f32 KV cache, one slot) and every prompt is sent to
     `/completion` as token ids: greedy (`top_k` 1 only), `n_predict` tokens, end tokens
     banned (`ignore_eos`; the fixture lists them, the test bans them too), no prompt cache.
  4. The tokens go to runtime/tests/fixtures/llama_cpp_greedy.json with each file's
     fingerprint, which the test checks before comparing.
  With --http, also: `tollgate serve` with a models.toml entry per file (f32 weights) answers
  /v1/completions for a text prompt with the text llama.cpp's server gives (both tokenize it
  themselves); a difference is an error.

With --lora, instead: `cargo run --example lora_gguf` writes the tiny `llama` model and the
random GGUF LoRA adapters of runtime/tests/lora_gguf.rs into ~/.cache/tollgate/lora-models;
llama-server serves the model with `--lora <adapter>` (one server per adapter, scale 1, and
each request names it with `"lora": [{"id": 0, "scale": 1}]`), the same prompts as above are
run, and the tokens go to runtime/tests/fixtures/llama_cpp_lora_greedy.json with the base's
and each adapter's fingerprint.

Usage: scripts/llama-cpp-greedy.py [--jobs N] [--http | --lora]   (CARGO_TARGET_DIR is honoured)
"""

import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "tollgate"
BUILD = CACHE / "llama-build"
MODELS = CACHE / "arch-models"
FIXTURE = REPO / "runtime" / "tests" / "fixtures" / "llama_cpp_greedy.json"
LORA_MODELS = CACHE / "lora-models"
LORA_FIXTURE = REPO / "runtime" / "tests" / "fixtures" / "llama_cpp_lora_greedy.json"
SERVER_ARGS = ["-c", "4096", "-np", "1", "-t", "2", "-ctk", "f32", "-ctv", "f32"]


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def sdist() -> pathlib.Path:
    path = CACHE / SDIST
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != SHA256:
        CACHE.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}",
             "--no-binary", ":all:", "--no-deps", "-d", str(CACHE)])
    if hashlib.sha256(path.read_bytes()).hexdigest() != SHA256:
        sys.exit(f"{path}: SHA-256 mismatch")
    return path


def server(jobs: int) -> pathlib.Path:
    """llama-server, built once."""
    binary = BUILD / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    source = BUILD / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        BUILD.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist()) as tar:
            tar.extractall(BUILD, filter="data")
    venv = CACHE / "cmake-venv"
    if not (venv / "bin" / "cmake").is_file():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", "cmake", "ninja"])
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    run(["nice", "-n", "19", "cmake", "-S", str(source), "-B", str(BUILD / "build"), "-G", "Ninja",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON"], env=env)
    run(["nice", "-n", "19", "cmake", "--build", str(BUILD / "build"), "--target", "llama-server",
         "-j", str(jobs)], env=env)
    return binary


def write_models(example: str = "arch_models", into: pathlib.Path = MODELS) -> dict:
    shutil.rmtree(into, ignore_errors=True)
    run(["nice", "-n", "19", "cargo", "run", "--release", "-q", "-p", "tollgate-runtime",
         "--example", example, "--", str(into)], cwd=REPO)
    return json.loads((into / "manifest.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def start_llama_server(binary: pathlib.Path, gguf: pathlib.Path, lora: pathlib.Path = None):
    """llama-server on `gguf` (f32 KV cache, one slot; with `lora`, that adapter at scale 1),
    once healthy: (process, port)."""
    port = free_port()
    extra = ["--lora", str(lora)] if lora else []
    log = open(gguf.parent / f"{(lora or gguf).stem}.server.log", "w")
    proc = subprocess.Popen(
        [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS,
         "--no-warmup", *extra],
        stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(proc, port, log.name)
    return proc, port


def wait_healthy(proc, port: int, log: str):
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"server exited: see {log}")
        time.sleep(0.5)
    sys.exit(f"server did not become healthy: see {log}")


def greedy(binary: pathlib.Path, gguf: pathlib.Path, prompts, steps: int,
           lora: pathlib.Path = None):
    """llama.cpp's greedy tokens after each prompt (with `lora` applied), and the
    end-of-generation tokens it banned (`ignore_eos` puts them in the request's logit bias,
    which the response reports)."""
    proc, port = start_llama_server(binary, gguf, lora)
    try:
        if lora:
            adapters = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/lora-adapters", timeout=30).read())
            if [(a["id"], a["scale"]) for a in adapters] != [(0, 1.0)]:
                sys.exit(f"{lora.name}: llama-server's adapters are {adapters}")
        out, banned = [], set()
        for prompt in prompts:
            body = {
                "prompt": prompt, "n_predict": steps, "temperature": 0, "top_k": 1,
                "samplers": ["top_k"], "cache_prompt": False, "ignore_eos": True,
                "return_tokens": True,
            }
            if lora:
                body["lora"] = [{"id": 0, "scale": 1.0}]
            r = post(port, "/completion", body)
            tokens = r["tokens"]
            if len(tokens) != steps:
                sys.exit(f"{gguf.name}: {len(tokens)} tokens, expected {steps}: {r}")
            if r.get("tokens_evaluated") != len(prompt):
                sys.exit(f"{gguf.name}: llama.cpp evaluated {r.get('tokens_evaluated')} prompt "
                         f"tokens of {len(prompt)} (a BOS added?)")
            out.append(tokens)
            banned |= {b["token"] for b in r["generation_settings"]["logit_bias"]}
        return out, sorted(banned)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def http_check(binary: pathlib.Path, manifest: dict, steps: int):
    """`tollgate serve` and llama-server give the same text for a text prompt, per model."""
    run(["nice", "-n", "19", "cargo", "build", "--release", "-q", "-p", "tollgate", "--bin",
         "tollgate"], cwd=REPO)
    meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                                     cwd=REPO, capture_output=True, text=True, check=True).stdout)
    tollgate = pathlib.Path(meta["target_directory"]) / "release" / "tollgate"
    toml = "".join(
        f'[models."{name}"]\nsource = {{ path = "{MODELS / m["file"]}" }}\n'
        f'backend = {{ type = "local", device = "cpu", weights = "f32" }}\n\n'
        for name, m in manifest["models"].items())
    (MODELS / "models.toml").write_text(toml)
    port = free_port()
    log = MODELS / "tollgate.log"
    proc = subprocess.Popen(
        [str(tollgate), "serve", "--config", str(MODELS / "models.toml"), "--listen",
         f"127.0.0.1:{port}", "--database", str(MODELS / "ledger.db")],
        env=dict(os.environ, TOLLGATE_API_KEYS="k"), stdout=open(log, "w"),
        stderr=subprocess.STDOUT)
    prompt = "The capital of France is"
    differ = []
    try:
        wait_healthy(proc, port, str(log))
        for name, m in manifest["models"].items():
            cpp, cpp_port = start_llama_server(binary, MODELS / m["file"])
            try:
                want = post(cpp_port, "/completion", {
                    "prompt": prompt, "n_predict": steps, "temperature": 0, "top_k": 1,
                    "samplers": ["top_k"], "cache_prompt": False, "ignore_eos": True,
                })["content"]
            finally:
                cpp.terminate()
                cpp.wait(timeout=30)
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                json.dumps({"model": name, "prompt": prompt, "max_tokens": steps,
                            "temperature": 0}).encode(),
                {"Content-Type": "application/json", "Authorization": "Bearer k"})
            with urllib.request.urlopen(req, timeout=300) as r:
                got = json.loads(r.read())["choices"][0]["text"]
            print(f"{name}: llama.cpp {want!r}\n{' ' * len(name)}  tollgate  {got!r}",
                  file=sys.stderr)
            if got != want:
                differ.append(name)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if differ:
        sys.exit(f"HTTP answers differ from llama.cpp's: {differ}")
    print("HTTP: tollgate serve answers as llama.cpp for every model", file=sys.stderr)


def write_fixture(path: pathlib.Path, fixture: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fixture, indent=1)
    # Lists of token ids on one line each.
    text = re.sub(r"\[[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    path.write_text(text + "\n")
    print(path)


def record_lora(binary: pathlib.Path, header: dict):
    """llama.cpp's greedy tokens with each GGUF LoRA adapter of runtime/tests/lora_gguf.rs."""
    manifest = write_models("lora_gguf", LORA_MODELS)
    base = LORA_MODELS / manifest["base"]["file"]
    fixture = dict(header, recorded_by="scripts/llama-cpp-greedy.py --lora",
                   server_args=header["server_args"] + " --lora <adapter>",
                   request=header["request"] + ", lora [{id 0, scale 1}]",
                   greedy_steps=manifest["greedy_steps"],
                   base={"file": manifest["base"]["file"],
                         "fingerprint": manifest["base"]["fingerprint"]},
                   adapters={})
    banned = set()
    for name, a in manifest["adapters"].items():
        tokens, b = greedy(binary, base, manifest["prompts"], manifest["greedy_steps"],
                           LORA_MODELS / a["file"])
        banned |= set(b)
        fixture["adapters"][name] = {
            "fingerprint": a["fingerprint"],
            "runs": [{"prompt": p, "tokens": t} for p, t in zip(manifest["prompts"], tokens)],
        }
        print(f"{name}: {tokens}", file=sys.stderr)
    fixture["banned_end_tokens"] = sorted(banned)
    write_fixture(LORA_FIXTURE, fixture)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--http", action="store_true",
                    help="also compare `tollgate serve`'s /v1/completions with llama.cpp's")
    ap.add_argument("--lora", action="store_true",
                    help="record llama.cpp's `--lora` tokens (the LoRA fixture) instead")
    args = ap.parse_args()
    binary = server(args.jobs)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    version = (version.stdout + version.stderr).strip().splitlines()
    header = {
        "recorded_by": "scripts/llama-cpp-greedy.py",
        "llama_cpp": f"llama-cpp-python {VERSION} sdist (vendored llama.cpp): "
                     + " ".join(v for v in version if v.startswith("version")),
        "server_args": " ".join(SERVER_ARGS),
        "request": "prompt as token ids, temperature 0, samplers [top_k], top_k 1, "
                   "ignore_eos, cache_prompt false",
    }
    if args.lora:
        record_lora(binary, header)
        return
    manifest = write_models()
    steps = manifest["greedy_steps"]
    fixture = dict(header, greedy_steps=steps, models={})
    for name, m in manifest["models"].items():
        tokens, banned = greedy(binary, MODELS / m["file"], m["prompts"], steps)
        fixture["models"][name] = {
            "fingerprint": m["fingerprint"],
            "banned_end_tokens": banned,
            "runs": [{"prompt": p, "tokens": t} for p, t in zip(m["prompts"], tokens)],
        }
        print(f"{name}: {tokens}", file=sys.stderr)
    write_fixture(FIXTURE, fixture)
    if args.http:
        http_check(binary, manifest, steps)


if __name__ == "__main__":
    main()
