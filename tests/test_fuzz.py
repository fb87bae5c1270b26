"""Fuzz the HTTP API against its own OpenAPI schema (schemathesis, bounded): no request may get a 5xx.

Runs against the real server (uvicorn on loopback) over a copy of an index, with an API key so
that the write routes are fuzzed too. LOOKALIKE_FUZZ_EXAMPLES sets the examples per operation.
"""
import os
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from server.app import create_app

from conftest import LiveServer

pytestmark = pytest.mark.integration

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("LOOKALIKE_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def base_url(fixture_index, tiny_model, tmp_path_factory):
    index = tmp_path_factory.mktemp("fuzz") / "index"
    shutil.copytree(fixture_index, index, ignore=shutil.ignore_patterns(".lock"))
    with LiveServer(create_app(index, model=tiny_model, api_keys=KEY, access_log=False)) as live:
        yield live.url


def test_no_server_errors(base_url):
    from hypothesis import given

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    cases_run: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        cases_run[name] = 0

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            cases_run[name] += 1
            response = case.call(base_url=base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{name}: {response.status_code} {response.text[:300]} for {case.as_curl_command()}")
            elif response.status_code >= 400:
                body = response.json()
                if not (isinstance(body, dict) and body.get("error", {}).get("code")):
                    failures.append(f"{name}: {response.status_code} without a JSON error body: {response.text[:200]}")

        run()
    assert len(cases_run) == 14, sorted(cases_run)
    assert all(n > 0 for n in cases_run.values()), cases_run
    print(f"fuzzed {sum(cases_run.values())} requests over {len(cases_run)} operations")
    assert failures == []
