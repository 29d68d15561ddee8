"""Every route of a real vLLM replica's published address but /health needs the run's key (issue 19):
vLLM's own ``--api-key`` guards only /v1, /v2, /inference and /cohere; server.auth.RequireKey, loaded
with ``--middleware``, guards the rest. The routes come from the engine's own /openapi.json."""

import socket

import httpx
import pytest

from server.auth import HEALTH_PATH, UNAUTHORIZED_BODY
from server.registry import Entry
from tests.support import auth

# Served by FastAPI beside the API and left out of /openapi.json.
DOC_ROUTES = {"/openapi.json": ["get"], "/docs": ["get"], "/docs/oauth2-redirect": ["get"], "/redoc": ["get"]}
# vLLM's dev and RL routes, loaded only with VLLM_SERVER_DEV_MODE=1 (vllm/entrypoints/serve/dev/, rl/online/).
DEV_ROUTES = {"/pause", "/resume", "/collective_rpc", "/sleep", "/wake_up", "/update_weights", "/reset_prefix_cache"}


def routes(entry: Entry) -> dict[str, list[str]]:
    """Path -> methods, as the engine itself lists them (path parameters filled in)."""
    spec = httpx.get(f"{entry.root_url}/openapi.json", headers=auth(entry), timeout=30).raise_for_status().json()
    listed = {path: list(ops) for path, ops in spec["paths"].items()}
    return {path.replace("{", "").replace("}", ""): methods for path, methods in {**listed, **DOC_ROUTES}.items()}


def answers_without_the_key(entry: Entry, headers: dict[str, str]) -> dict[str, int]:
    """Every route and method that does not answer 401 with our body, and what it answered."""
    found = {}
    with httpx.Client(base_url=entry.root_url, headers=headers, timeout=30) as client:
        for path, methods in routes(entry).items():
            for method in methods:
                r = client.request(method.upper(), path, json=None if method == "get" else {})
                if (r.status_code, r.content) != (401, UNAUTHORIZED_BODY):
                    found[f"{method.upper()} {path}"] = r.status_code
    return found


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5"}],
                         ids=["no key", "wrong key", "other scheme"])
def test_every_route_but_health_needs_the_key(policy_server, headers):
    assert answers_without_the_key(policy_server, headers) == {f"GET {HEALTH_PATH}": 200}
    assert {"/invocations", "/tokenize", "/detokenize", "/metrics", "/v1/chat/completions"} <= set(routes(policy_server))


@pytest.mark.parametrize("path", ["/invocations", "/v1/chat/completions", "/tokenize"])
def test_a_request_without_the_key_is_refused_before_its_body_is_read(policy_server, path):
    # 50 MB announced, none sent: the 401 comes without waiting for the body, so no layer of vLLM's app
    # outside ours (its SageMaker bootstrap adds middleware after --middleware's) reads it first.
    with socket.create_connection((policy_server.host, policy_server.port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 52428800\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(UNAUTHORIZED_BODY) and (chunk := s.recv(4096)):  # head and body: two writes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(UNAUTHORIZED_BODY)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no key", "wrong key"])
def test_dev_mode_routes_need_the_key_too(dev_mode_server, headers):
    # The dev server serves every route of the normal one and the dev/RL routes beside them.
    assert DEV_ROUTES <= set(routes(dev_mode_server))
    assert answers_without_the_key(dev_mode_server, headers) == {f"GET {HEALTH_PATH}": 200}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_with_the_key_the_engine_serves(dev_mode_server, scheme):
    key = dev_mode_server.read_api_key()
    with httpx.Client(base_url=dev_mode_server.root_url, headers={"Authorization": f"{scheme} {key}"},
                      timeout=120) as client:
        chat = client.post("/v1/chat/completions", json={
            "model": dev_mode_server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] is not None
        tokens = client.post("/tokenize", json={"model": dev_mode_server.model, "prompt": "Hello there"})
        assert tokens.status_code == 200 and tokens.json()["count"] > 0
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
        assert client.get("/is_paused").json() == {"is_paused": False}
