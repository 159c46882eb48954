"""Fuzzing the HTTP API from its own OpenAPI spec: no input makes the server fail (5xx), and
every response is what the spec says (status code, content type, body schema)."""

import os

import hypothesis
import schemathesis
from fake_backend import FakeBackend
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from glmjax.serving.openai_api import make_app

schema = schemathesis.openapi.from_asgi('/openapi.json', make_app(FakeBackend()))


@schema.parametrize()
@hypothesis.settings(max_examples=int(os.environ.get('FUZZ_EXAMPLES', 30)), deadline=None,
                     derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
def test_no_server_error(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_schema_conformance])
