"""The OpenAPI schema against the running app, with schemathesis: generated requests (valid and
invalid) for every operation; no 5xx, status codes, content types and bodies as documented.
Bounded: a few examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from pigeon.api import Settings, create_app
from api_support import tiny_predictor

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def api_schema():
    app = create_app(tiny_predictor(), Settings(warmup=False))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_operations_conform_to_the_schema(api_schema):
    # Random bytes are a schema-valid `image` but not a photo: a 4xx there is right, so the
    # "positive data must be accepted" check does not apply; every other default check does.
    # (Driven through hypothesis directly: schemathesis.pytest.from_fixture fails on this pytest version.)
    from hypothesis import given
    from schemathesis.checks import positive_data_acceptance

    seen = []
    for result in api_schema.get_all_operations():
        op = result.ok()
        seen.append(op.label)

        @given(case=op.as_strategy())
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def run(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        run()
    assert len(seen) >= 5, seen


def test_schema_documents_every_endpoint(api_schema):
    raw = api_schema.raw_schema
    assert {"/locate", "/locate/batch", "/health", "/version", "/cells", "/metrics"} <= set(raw["paths"])
    locate = raw["paths"]["/locate"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(locate["responses"])
    body = locate["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["$ref"].startswith("#/components/schemas/")


def test_api_key_scheme_is_shown_exactly_when_enforced():
    """APIKeyHeader: with a key, /openapi.json declares the X-API-Key scheme on the protected operations
    (and only there); without one it declares none (so a client is never told to send a key for nothing)."""
    plain = create_app(tiny_predictor(), Settings(warmup=False)).openapi()
    assert "securitySchemes" not in plain.get("components", {})
    assert not any("security" in op for ops in plain["paths"].values() for op in ops.values())
    keyed = create_app(tiny_predictor(), Settings(api_key="k3y", warmup=False)).openapi()
    scheme = keyed["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
    protected = {("/locate", "post"), ("/locate/batch", "post"), ("/cells", "get"), ("/version", "get"), ("/metrics", "get")}
    for path, ops in keyed["paths"].items():
        for method, op in ops.items():
            assert op.get("security") == ([{"ApiKey": []}] if (path, method) in protected else None), (path, method)
    assert "/health" in keyed["paths"] and "/" not in keyed["paths"]
