"""What the structured-output and tool tests share (`test_structured.py`, `test_tools.py`): the
two setups (`api`: the embedded server, and a gateway routing to a `tollgate worker`), a refusal's
body, and the tools they call."""

import signal

import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, free_port, routed_model, start_server, start_worker, stop_server, write_config

MODEL = "smollm2-135m"
WORKER_TOKEN = "structured-worker-token"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}

@pytest.fixture(scope="module")
def routed():
    """A gateway whose model is served by a `tollgate worker` over HTTP."""
    port = free_port()
    worker, _ = start_worker(port, WORKER_TOKEN)
    config = write_config("tollgate-structured-", routed_model(MODEL, port))
    gateway = start_server({"TOLLGATE_WORKER_TOKEN": WORKER_TOKEN}, ["--config", config])
    # The gateway probes its members every second; wait until the worker is in rotation.
    c = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=3, timeout=120)
    c.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "hi"}], max_tokens=1)
    yield gateway
    assert stop_server(gateway) == 0
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)


@pytest.fixture(scope="module", params=["embedded", "routed"])
def api(request, server) -> OpenAI:
    srv = server if request.param == "embedded" else request.getfixturevalue("routed")
    return OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)



def bad_request(api, **kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=MODEL, max_tokens=5, **kwargs)
    return e.value.body


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
ASK = [SYSTEM, {"role": "user", "content": "What is the weather like in Paris today?"}]
