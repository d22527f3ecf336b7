"""Per-customer caps on concurrent sequences (`max_sequences_per_customer`), through the SDK."""

import threading

import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, NO_END, ROOT, start_server, stop_server, write_config

MODEL = "smollm2-135m"


def test_a_customer_over_its_sequence_cap_gets_429_and_others_are_served():
    config = write_config(
        "tollgate-cap-",
        f'[models."{MODEL}"]\n'
        f'source = {{ path = "{ROOT}/models/SmolLM2-135M-Instruct.Q4_1.gguf" }}\n'
        'backend = { type = "local", device = "cpu" }\n'
        "max_sequences_per_customer = 2\n",
    )
    srv = start_server(extra_args=["--config", config])
    try:
        client = OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Write a long story about a dragon."}]
        # Two streams hold the customer's two slots while they are open: 4,000 tokens each with
        # the end tokens banned, so neither can end before the third request, on any machine.
        streams = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4000,
                                                  temperature=0, logit_bias=NO_END, stream=True)
                   for _ in range(2)]
        firsts = [next(iter(s)) for s in streams]
        assert all(f.choices for f in firsts)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
        assert "limit is 2" in e.value.body["message"]
        for s in streams:
            s.close()
        # Closing the streams gives the slots back once the server notices the client left.
        pause = threading.Event()
        for _ in range(300):  # a 30 s guard against a hang
            try:
                r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, n=2)
                assert len(r.choices) == 2
                break
            except openai.RateLimitError:
                pause.wait(0.1)
        else:
            raise AssertionError("the slots were not given back after the streams closed")
    finally:
        assert stop_server(srv) == 0
