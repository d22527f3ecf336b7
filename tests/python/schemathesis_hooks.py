"""Schemathesis hooks for `test_openapi_fuzz.py` (loaded through SCHEMATHESIS_HOOKS).

They keep the run fast and pointed at code that matters, without changing the published
document: every generation is held to a few tokens (`max_tokens` and its aliases at most
`MAX_TOKENS`, `n` at most 2), most generated `model` values are replaced by the served model so
that generation itself is fuzzed rather than only the 404 path, half of the customer ids in
admin paths name a customer that exists, and each request carries the right credential (a
customer key on `/v1`, the admin token on `/admin`). Half of the generation bodies are also
steered towards what this small model can serve (text content, no tool definitions or
grammars generated at random, which the server refuses with 400), so that the accepted path —
generation, streaming, stop sequences, `n`, logprobs, metering — is fuzzed as much as the
validation is; the other half go out as generated."""

import os
import random

MODEL = os.environ.get("FUZZ_MODEL", "smollm2-135m")
API_KEY = os.environ.get("FUZZ_API_KEY", "")
ADMIN_TOKEN = os.environ.get("FUZZ_ADMIN_TOKEN", "")
CUSTOMER = os.environ.get("FUZZ_CUSTOMER", "fuzz-target")
MAX_TOKENS = 4
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

import schemathesis

_rng = random.Random(20240622)


def _clamp(body: dict, field: str, top: int, default=None) -> None:
    value = body.get(field)
    if isinstance(value, bool):
        return
    if isinstance(value, int) and value > top:
        body[field] = top
    elif value is None and default is not None:
        # Absent and `null` both mean "no limit" to the server: a generation of the whole
        # context, minutes long on this machine, which is not what the fuzzer is here to test.
        body[field] = default


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    headers = case.headers if case.headers is not None else {}
    token = ADMIN_TOKEN if path.startswith("/admin") else API_KEY
    headers["Authorization"] = f"Bearer {token}"
    case.headers = headers
    if path.startswith("/admin") and case.path_parameters:
        for name in ("id", "customer_id"):
            if name in case.path_parameters and _rng.random() < 0.5:
                case.path_parameters[name] = CUSTOMER
    if case.operation.method.upper() == "POST" and path in GENERATION and isinstance(case.body, dict):
        body = case.body
        if "model" in body and _rng.random() < 0.85:
            body["model"] = MODEL
        _clamp(body, "max_tokens", MAX_TOKENS, MAX_TOKENS if path != "/v1/responses" else None)
        _clamp(body, "max_completion_tokens", MAX_TOKENS)
        _clamp(body, "max_output_tokens", MAX_TOKENS, MAX_TOKENS if path == "/v1/responses" else None)
        _clamp(body, "n", 2)
        _clamp(body, "best_of", 2)
        if _rng.random() < 0.5:
            _steer(path, body)


ROLES = ("system", "developer", "user", "assistant")


def _text(value, fallback="Hi"):
    return value if isinstance(value, str) and value else fallback


def _steer(path: str, body: dict) -> None:
    """Keeps the generated sampling fields and replaces what the model cannot serve."""
    for field in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "text",
                  "functions", "function_call", "echo", "suffix", "reasoning", "include",
                  "truncation", "background", "previous_response_id"):
        body.pop(field, None)
    if path == "/v1/chat/completions":
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        steered = []
        for m in messages[:4]:
            m = m if isinstance(m, dict) else {}
            role = m.get("role") if m.get("role") in ROLES else "user"
            steered.append({"role": role, "content": _text(m.get("content"))})
        body["messages"] = steered + [{"role": "user", "content": "Hi"}]
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
    elif path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = [p for p in prompt if isinstance(p, str) and p][:2] or "Hi"
        body["prompt"] = prompt if isinstance(prompt, list) else _text(prompt)
    else:
        body["input"] = _text(body.get("input"))
    if isinstance(body.get("stop"), list):
        body["stop"] = body["stop"][:4]


LOG = os.environ.get("FUZZ_LOG")


@schemathesis.hook
def after_call(context, case, response):
    """With FUZZ_LOG set: one line per answer (status, operation, error), for tuning."""
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{response.status_code} {case.operation.method} {case.operation.path} {response.text[:300]!r}\n")
