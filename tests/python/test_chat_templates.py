"""Chat templates of the model families render in Tollgate exactly as jinja2 renders them.

jinja2 is set up the way Hugging Face transformers renders chat templates (a sandboxed
environment with trim_blocks, lstrip_blocks and loop controls; `raise_exception`,
`strftime_now`; `tojson` as `json.dumps` without ASCII escaping). Tollgate's side is the
runtime's `ChatTemplate` through the example `render_chat_template` (JSON on stdin, the text on
stdout). Both render the same context; the texts must be identical, and a template that raises
must raise in both.

The templates: Llama 3.1/3.2/3.3, Qwen 2.5, Mistral Nemo and Phi-3.5 as published in the
models' tokenizer_config.json (llama.cpp keeps copies, fetched with the tokenizer vocabularies
by scripts/fetch-vocabs.sh), SmolLM2's from the development GGUF, and Llama 2 [INST],
Mistral 7B v0.1 and ChatML written below from their tokenizer_config.json. Missing files fail
the tests, never skip them.
"""

import datetime
import json
import os
import pathlib
import subprocess

import jinja2
import jinja2.ext
import jinja2.sandbox
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "tollgate"
TEMPLATE_DIR = pathlib.Path(os.environ.get("TOLLGATE_TEMPLATE_DIR") or CACHE / "llama-templates")
DEV_MODEL = pathlib.Path(
    os.environ.get("TOLLGATE_TEST_MODEL") or ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cached(name):
    path = TEMPLATE_DIR / name
    assert path.is_file(), f"{path} is missing: run scripts/fetch-vocabs.sh"
    return path.read_text()


def smollm2():
    import gguf

    assert DEV_MODEL.is_file(), f"{DEV_MODEL} is missing: run scripts/fetch-model.sh"
    field = gguf.GGUFReader(str(DEV_MODEL)).fields["tokenizer.chat_template"]
    return field.contents()


# family: (template source, bos, eos, supports tools, system role, strict alternation)
FAMILIES = {
    "llama-3.1": (lambda: cached("meta-llama-Llama-3.1-8B-Instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>", True),
    "llama-3.2": (lambda: cached("meta-llama-Llama-3.2-3B-Instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>", True),
    "llama-3.3": (lambda: cached("meta-llama-Llama-3.3-70B-Instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>", True),
    "qwen-2.5": (lambda: cached("Qwen-Qwen2.5-7B-Instruct.jinja"), "", "<|im_end|>", True),
    "mistral-nemo": (lambda: cached("mistralai-Mistral-Nemo-Instruct-2407.jinja"), "<s>", "</s>", True),
    "phi-3.5": (lambda: cached("microsoft-Phi-3.5-mini-instruct.jinja"), "<s>", "<|endoftext|>", False),
    "smollm2": (smollm2, "", "<|im_end|>", False),
    "llama-2": (lambda: LLAMA2, "<s>", "</s>", False),
    "mistral-v0.1": (lambda: MISTRAL_V01, "<s>", "</s>", False),
    "chatml": (lambda: CHATML, "", "<|im_end|>", False),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city <with markup & 'quotes'>.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CALL = {
    "id": "call12345",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}},
}


def conversations(family, tools):
    """(case name, context) pairs for a family."""
    plain = [
        ("user only", {"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": True}),
        (
            "system and user",
            {
                "messages": [
                    {"role": "system", "content": "You are terse.  "},
                    {"role": "user", "content": "  What is 2+2?\n"},
                ],
                "add_generation_prompt": True,
            },
        ),
        (
            "multi-turn without generation prompt",
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke about llamas 🦙."},
                ],
                "add_generation_prompt": False,
            },
        ),
        (
            "roles that do not alternate",
            {
                "messages": [
                    {"role": "user", "content": "one"},
                    {"role": "user", "content": "two"},
                ],
                "add_generation_prompt": True,
            },
        ),
    ]
    if family == "mistral-v0.1":
        plain[1] = ("system role", plain[1][1])
    out = list(plain)
    if tools:
        tool_role = "ipython" if family.startswith("llama-3") else "tool"
        result = {"role": tool_role, "content": json.dumps({"temperature": 21, "unit": "celsius"})}
        if family == "mistral-nemo":
            result["tool_call_id"] = CALL["id"]
        out += [
            (
                "tools offered",
                {
                    "messages": [
                        {"role": "system", "content": "You can call tools."},
                        {"role": "user", "content": "Weather in Zürich?"},
                    ],
                    "tools": [WEATHER_TOOL],
                    "add_generation_prompt": True,
                },
            ),
            (
                "tool call and its result",
                {
                    "messages": [
                        {"role": "user", "content": "Weather in Zürich?"},
                        {"role": "assistant", "content": "", "tool_calls": [CALL]},
                        result,
                    ],
                    "tools": [WEATHER_TOOL],
                    "add_generation_prompt": True,
                },
            ),
        ]
        if family.startswith("llama-3"):
            search = {
                "type": "function",
                "function": {"name": "brave_search", "arguments": {"query": "llamas"}},
            }
            out += [
                (
                    "builtin tools and a date",
                    {
                        "messages": [{"role": "user", "content": "Search for llamas."}],
                        "builtin_tools": ["brave_search", "wolfram_alpha"],
                        "date_string": "29 Nov 2026",
                        "add_generation_prompt": True,
                    },
                ),
                (
                    "tool call: builtin, ends with <|eom_id|>",
                    {
                        "messages": [
                            {"role": "user", "content": "Search for llamas."},
                            {"role": "assistant", "content": "", "tool_calls": [search]},
                            {"role": "ipython", "content": "Llamas are camelids."},
                        ],
                        "builtin_tools": ["brave_search", "wolfram_alpha"],
                        "add_generation_prompt": True,
                    },
                ),
            ]
    for _, ctx in out:
        # Llama 3.2 prints today's date unless given one; pin it so both sides agree.
        ctx.setdefault("date_string", "26 Jul 2024")
    return out


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def render_bin():
    explicit = os.environ.get("TOLLGATE_RENDER_BIN")
    if explicit:
        path = pathlib.Path(explicit)
    else:
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
        path = target / "release" / "examples" / "render_chat_template"
    assert path.is_file(), (
        f"{path} is missing: cargo build --release -p tollgate-runtime --example render_chat_template"
    )
    return path


def jinja2_render(source, bos, eos, ctx):
    try:
        return hf_environment().from_string(source).render(bos_token=bos, eos_token=eos, **ctx), None
    except jinja2.exceptions.TemplateError as e:
        return None, str(e)


def tollgate_render(source, bos, eos, ctx):
    request = {"template": source, "bos_token": bos, "eos_token": eos, "context": ctx}
    proc = subprocess.run([render_bin()], input=json.dumps(request).encode(), capture_output=True, timeout=60)
    if proc.returncode != 0:
        return None, proc.stderr.decode(errors="replace")
    return proc.stdout.decode(), None


CASES = [
    (family, name, ctx)
    for family, (_, _, _, tools) in FAMILIES.items()
    for name, ctx in conversations(family, tools)
]


@pytest.mark.parametrize(
    "family,name,ctx", CASES, ids=[f"{family}: {name}" for family, name, _ in CASES]
)
def test_renders_like_jinja2(family, name, ctx):
    load, bos, eos, _ = FAMILIES[family]
    source = load()
    expected, expected_error = jinja2_render(source, bos, eos, ctx)
    got, error = tollgate_render(source, bos, eos, ctx)
    if expected_error is not None:
        assert got is None, f"jinja2 raised {expected_error!r}; Tollgate rendered {got!r}"
        # The template's own message comes through.
        assert expected_error in error, f"jinja2: {expected_error!r}; Tollgate: {error!r}"
        return
    assert error is None, f"Tollgate failed: {error}"
    assert got == expected


def test_the_tool_cases_reach_the_tool_markup():
    """The tool conversations render the families' tool syntax, so the comparison above covers
    it (a template that ignored `tools` would compare equal too)."""
    markers = {
        "llama-3.1": [
            "Environment: ipython",
            '{"name": "get_weather", "parameters": {"city": "Zürich"',
            "<|start_header_id|>ipython<|end_header_id|>",
            '<|python_tag|>brave_search.call(query="llamas")<|eom_id|>',
        ],
        "qwen-2.5": ["<tools>", "<tool_call>", "<tool_response>"],
        "mistral-nemo": ["[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]"],
    }
    for family, needles in markers.items():
        load, bos, eos, tools = FAMILIES[family]
        text = "".join(
            jinja2_render(load(), bos, eos, ctx)[0] or ""
            for name, ctx in conversations(family, tools)
            if name.startswith("tool")
        )
        for needle in needles:
            assert needle in text, f"{family}: {needle!r} not rendered"
