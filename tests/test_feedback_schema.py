"""Property-based fuzzing of the JSON API from its OpenAPI spec: no input may cause a 5xx.

Schemathesis generates the requests; hypothesis drives them directly, per operation, because
schemathesis' pytest plugin does not run under the pytest used here (9.x).
"""

import pytest

from fundax.feedback import app as app_lib
import feedback_helpers

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
EXAMPLES = 25  # per operation; enough to hit bounds, wrong types and odd paths in seconds


def test_no_server_errors(tmp_path):
  store, _ = feedback_helpers.make_store(tmp_path, num_prompts=1, per_prompt=2)
  _, token = store.create_rater("boss", is_admin=True)
  headers = {"Authorization": f"Bearer {token}"}  # the admin reaches every route
  schema = schemathesis.openapi.from_asgi("/openapi.json", app_lib.create_app(store))
  operations = [result.ok() for result in schema.get_all_operations()]
  assert len(operations) >= 11
  checked = []
  modes = list(schemathesis.GenerationMode)  # valid requests and deliberately invalid ones
  for operation in operations:

    @hypothesis.given(case=hypothesis.strategies.one_of(
        [operation.as_strategy(generation_mode=mode) for mode in modes]))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case):
      response = case.call(headers=headers)
      assert response.status_code < 500, (case.method, case.formatted_path, case.body,
                                           response.text)

    check()  # pylint: disable=no-value-for-parameter
    checked.append(operation.label)
  assert len(modes) == 2
  assert "POST /api/ratings" in checked and "GET /media/{path}" in checked
