"""Schemathesis: requests generated from our own /openapi.json never get a 5xx (nor a malformed error body)."""

from __future__ import annotations

import pytest
import schemathesis
from gateway_helpers import TINY, serve, serve_gateway, upstream_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm_fusion.backends.mock_upstream import MockUpstream

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def gateway():
    import torch

    torch.set_num_threads(1)
    tiny = {**TINY, "max_output_tokens": 8, "batch_wait_ms": 1}
    with serve(MockUpstream()) as up:
        config = {"models": [tiny, upstream_model("up", up.url)], "server": {"access_log": False, "max_n": 4}}
        with serve_gateway(config) as served:
            yield served


def fuzz_operation(op, base_url: str, failures: list[str], statuses: dict[tuple[str, int], int]) -> None:
    """Send EXAMPLES_PER_OPERATION generated requests to one operation, recording 5xx answers."""

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(), model=st.sampled_from([None, "tiny", "tiny", "up"]))
    def check(case, model):
        # Random model names only reach the 404 path: most cases name a served model to reach the backends.
        if model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        response = case.call(base_url=base_url, timeout=60)
        statuses[op.path, response.status_code] = statuses.get((op.path, response.status_code), 0) + 1
        if response.status_code >= 500:
            failures.append(f"{op.method.upper()} {op.path} -> {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400 and op.path != "/metrics":
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error), response.text

    check()


def test_no_server_errors_on_generated_requests(gateway):
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    failures: list[str] = []
    statuses: dict[tuple[str, int], int] = {}
    for op in operations:
        fuzz_operation(op, gateway.url, failures, statuses)
    assert not failures, "\n".join(failures[:10])
    print(sorted(statuses.items()))
    assert statuses.get(("/v1/chat/completions", 200)), "no generated chat request reached a backend"
