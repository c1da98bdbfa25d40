"""`--engine ray`: the gateway as a Ray Serve ingress, a local model as its own Serve deployment (two replicas),
an OpenAI upstream in the ingress — driven with the official `openai` client over Serve's HTTP proxy on 127.0.0.1.

One local Ray (2 CPUs, no dashboard) and one Serve application for the whole module: Ray starts slowly here."""

from __future__ import annotations

import time

import openai
import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra (ray[serve]) is not installed")
from gateway_helpers import TINY, free_port, upstream_model
from gateway_helpers import serve as serve_uvicorn
from ray import serve

from slm_fusion import deploy_ray
from slm_fusion.app import create_app
from slm_fusion.backends.mock_upstream import ANSWER, MockUpstream
from slm_fusion.config import FusionConfig

DEPLOYMENT = deploy_ray.deployment_name("tiny")


@pytest.fixture(scope="module")
def gateway():
    with serve_uvicorn(MockUpstream()) as upstream:
        config = FusionConfig.model_validate({
            "models": [{**TINY, "replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "max_output_tokens": 4096},
                       {**TINY, "name": "tiny-auto", "ray_actor_options": {"num_cpus": 0.5},
                        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4}},
                       upstream_model("big", upstream.url)],
            "routers": {"tiers": {"type": "rules", "default": "tiny",
                                  "rules": [{"model": "big", "keywords": ["premium"]}]}},
            "virtual_models": {"auto": {"router": "tiers"}},
            "ui": {"enabled": False},
        })
        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
        try:
            port = free_port()
            deploy_ray.run(config, host="127.0.0.1", port=port, address=None, blocking=False)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
            client.config = config  # the parity test serves the same config under uvicorn
            yield client
        finally:
            serve.shutdown()
            ray.shutdown()


def _replicas() -> list[dict]:
    """The model's live replica actors (Serve names them SERVE_REPLICA::app#deployment#id, namespace serve); the
    GCS's named-actor list needs no dashboard, unlike ray.util.state."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{DEPLOYMENT}#" in a["name"]]


def test_chat_and_stream_through_the_serve_ingress(gateway):
    reply = gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0)
    assert reply.model == "tiny" and reply.choices[0].message.content
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 1  # tokenizer twin in the ingress

    again = gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy on either replica

    chunks = list(gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_routed_request_reaches_the_upstream_in_the_ingress(gateway):
    raw = gateway.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "a premium question"}], max_tokens=8)
    assert raw.headers["x-slm-fusion-model"] == "big"
    assert raw.parse().choices[0].message.content == ANSWER
    local = gateway.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "plain"}], max_tokens=4)
    assert local.headers["x-slm-fusion-model"] == "tiny"


def test_the_reasoning_layer_answers_as_under_uvicorn(gateway):
    """Same config, same requests: the Ray ingress (reasoning layer in the ingress, decode in a replica) and the
    uvicorn gateway return the same text, usage and reasoning details (greedy, so any replica gives the same)."""
    asks = [{"max_tokens": 12}, {"max_tokens": 24, "extra_body": {"reasoning_budget": 4}}]
    with serve_uvicorn(create_app(gateway.config)) as local:
        plain = openai.OpenAI(base_url=local.v1, api_key="none", max_retries=0)
        for ask in asks:
            kw = {"model": "tiny", "messages": [{"role": "user", "content": "What is 2+3?"}], "temperature": 0, **ask}
            on_ray, on_uvicorn = gateway.chat.completions.create(**kw), plain.chat.completions.create(**kw)
            assert on_ray.choices[0].message.content == on_uvicorn.choices[0].message.content
            assert on_ray.usage == on_uvicorn.usage
            assert on_ray.choices[0].model_extra == on_uvicorn.choices[0].model_extra  # slm_fusion details
        assert on_ray.choices[0].model_extra["slm_fusion"]["reasoning_tokens"] <= 4  # the budget applied


def test_an_autoscaled_model_is_a_serve_deployment_with_its_own_replicas(gateway):
    reply = gateway.chat.completions.create(model="tiny-auto", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4)
    assert reply.model == "tiny-auto" and reply.usage.completion_tokens >= 1
    status = serve.status().applications[deploy_ray.APP_NAME].deployments[deploy_ray.deployment_name("tiny-auto")]
    assert status.status == "HEALTHY" and status.replica_states.get("RUNNING", 0) >= 1


def test_bad_input_is_an_openai_error(gateway):
    with pytest.raises(openai.BadRequestError) as e:
        gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=99999)
    assert "max_tokens" in str(e.value)


def test_killed_replicas_fail_in_openai_shape_and_serve_restarts_them(gateway):
    before = _replicas()
    assert len(before) == 2
    # A long stream is running on one replica (its first token has arrived) when both replicas are killed: up to
    # ~2000 tokens of the tiny model (its context) take seconds, the kills a fraction of that.
    stream = gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                             max_tokens=4000, temperature=1.0, stream=True)
    first = next(iter(stream))
    assert first.choices
    for actor in before:
        ray.kill(ray.get_actor(actor["name"], namespace="serve"), no_restart=True)
    with pytest.raises(openai.APIError, match="Ray Serve replica failed"):  # an in-band SSE error, OpenAI's shape
        for _ in stream:
            pass
    # The next request: retried onto a restarted replica, or a 503 in OpenAI's shape while Serve restarts them.
    try:
        reply = gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)
        assert reply.choices[0].message.content
    except openai.APIStatusError as e:
        assert e.status_code == 503 and e.body["code"] == "unavailable", e.body

    killed = {a["name"] for a in before}
    deadline = time.monotonic() + 180
    while True:
        status = serve.status().applications[deploy_ray.APP_NAME].deployments[DEPLOYMENT]
        fresh = [a for a in _replicas() if a["name"] not in killed]
        if status.status == "HEALTHY" and len(fresh) == 2:
            break
        assert time.monotonic() < deadline, f"Serve did not restart the replicas: {status}"
        time.sleep(0.5)  # polling interval of a condition checked above, not a stand-in for it
    reply = gateway.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content
