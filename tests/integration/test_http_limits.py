"""What a client can make the gateway hold is bounded: body bytes (413 before the body is read), JSON depth, the time
to send a request's headers (slowloris), idle HTTP and gRPC connections; and the REST API, fuzzed from its own
OpenAPI schema, answers every request without a 5xx or a hang.

One lone gateway in front of the shared mesh's stages, with tiny limits so that fuzzed requests that pass
validation really generate, cheaply (16x16, one step).
"""

from __future__ import annotations

import collections
import concurrent.futures
import socket
import time

import grpc
import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .test_stage_failures import start_gateway

MAX_BODY = 64 << 10
HEADER_TIMEOUT_S, IDLE_TIMEOUT_S = 1.0, 2.0
CLOSE_BOUND_S = 8.0         # a connection the gateway should close is closed well within this
LIMITS = ("--max-body-bytes", str(MAX_BODY), "--header-timeout", str(HEADER_TIMEOUT_S),
          "--idle-timeout", str(IDLE_TIMEOUT_S), "--max-steps", "2", "--max-output-pixels", "1024",
          "--default-size", "16x16", "--default-steps", "1", "--max-queued-jobs", "8")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, mesh):
    directory = tmp_path_factory.mktemp("limits")
    process, grpc_address, http_url = start_gateway(directory, mesh, LIMITS, log=directory / "gateway.log")
    yield grpc_address, http_url, directory / "gateway.log"
    process.terminate()
    assert process.wait(timeout=30) == 0


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("http://").rpartition(":")
    return host, int(port)


def seconds_until_closed(address: str, send: bytes = b"", trickle: bytes = b"", limit_s: float = CLOSE_BOUND_S
                         ) -> float:
    """Open a TCP connection, send `send`, then `trickle` a byte every 0.2 s; how long until the server closes it
    (reading whatever it says first). Fails if it is still open after `limit_s`."""
    started = time.monotonic()
    with socket.create_connection(host_port(address), timeout=0.2) as conn:
        conn.sendall(send)
        while time.monotonic() - started < limit_s:
            if trickle:
                try:
                    conn.send(trickle[:1])
                except OSError:             # closed under us while writing
                    return time.monotonic() - started
                trickle = trickle[1:]
            try:
                if conn.recv(65536) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                return time.monotonic() - started
    raise AssertionError(f"{address}: connection still open after {limit_s}s")


def test_a_body_declared_over_the_limit_is_413_before_it_is_sent(gateway):
    _, http_url, _ = gateway
    head = (f"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY * 100}\r\n\r\n").encode()
    with socket.create_connection(host_port(http_url), timeout=5) as conn:
        conn.sendall(head)              # and not one byte of the body: the answer must not wait for it
        reply = b""
        while piece := conn.recv(65536):   # to the end: the gateway closes the connection after the answer
            reply += piece
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"param":"body"' in reply and "--max-body-bytes" in reply


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/videos"])
def test_a_streamed_body_over_the_limit_is_413(gateway, path):
    _, http_url, _ = gateway

    def chunks():                       # chunked transfer: no Content-Length to go by, the bytes are counted
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"x" * 4096

    reply = httpx.post(http_url + path, content=chunks(), headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["param"] == "body"


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/videos"])
def test_deeply_nested_json_is_400(gateway, path):
    _, http_url, _ = gateway
    body = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"       # past Python's recursion limit, under MAX_BODY
    reply = httpx.post(http_url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == {"message": "body: JSON nested too deeply", "type": "invalid_request_error",
                                     "param": "body", "code": None}


def test_steps_over_the_gateways_max_steps_are_400(gateway):
    _, http_url, _ = gateway
    reply = httpx.post(f"{http_url}/v1/images/generations", json={"prompt": "a", "num_inference_steps": 3},
                       timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "num_inference_steps"
    assert "1..2" in reply.json()["error"]["message"]


def seconds_until_grpc_goes_idle(address: str) -> float:
    """After one call, how long until the server's GOAWAY for an idle connection sends the channel back to IDLE."""
    states: list[grpc.ChannelConnectivity] = []     # appended from grpc's own thread, starting with IDLE

    def after_ready() -> list[grpc.ChannelConnectivity]:
        return states[states.index(grpc.ChannelConnectivity.READY) + 1:] if grpc.ChannelConnectivity.READY in states \
            else []

    with grpc.insecure_channel(address) as channel:
        channel.subscribe(states.append)
        gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=30)
        ready_at = time.monotonic()
        while grpc.ChannelConnectivity.IDLE not in after_ready() and time.monotonic() - ready_at < CLOSE_BOUND_S:
            time.sleep(0.05)
        assert grpc.ChannelConnectivity.IDLE in after_ready(), f"{address}: {states} after {CLOSE_BOUND_S}s"
        return time.monotonic() - ready_at


def test_connections_that_send_nothing_trickle_headers_or_sit_idle_are_closed(gateway):
    grpc_address, http_url, _ = gateway
    # Slowloris: a byte every 0.2 s would keep a plain uvicorn connection forever (every byte resets its timer).
    slow = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 100
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    stalled_body = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10
    checks = {   # (measure, lower bound, upper bound), all at once: each takes seconds of waiting
        "http sends nothing": (lambda: seconds_until_closed(http_url), 0, HEADER_TIMEOUT_S + 2),
        "http trickles headers": (lambda: seconds_until_closed(http_url, trickle=slow), 0, HEADER_TIMEOUT_S + 2),
        # A kept-alive connection after its response: closed once idle, and again if it then starts to trickle.
        "http idle after a response": (lambda: seconds_until_closed(http_url, send=request), IDLE_TIMEOUT_S - 0.5,
                                       IDLE_TIMEOUT_S + 2),
        "http trickles after a response": (lambda: seconds_until_closed(http_url, send=request, trickle=slow), 0,
                                           IDLE_TIMEOUT_S + 2),
        "http body stalls": (lambda: seconds_until_closed(http_url, send=stalled_body), IDLE_TIMEOUT_S - 0.5,
                             IDLE_TIMEOUT_S + 2),
        "grpc never handshakes": (lambda: seconds_until_closed(grpc_address), 0, HEADER_TIMEOUT_S + 2),
        # gRPC checks idleness on a timer of its own: the GOAWAY comes up to about twice the limit late.
        "grpc idle after a call": (lambda: seconds_until_grpc_goes_idle(grpc_address), IDLE_TIMEOUT_S - 0.5,
                                   2 * IDLE_TIMEOUT_S + 2),
    }
    with concurrent.futures.ThreadPoolExecutor(len(checks)) as pool:
        futures = {name: pool.submit(measure) for name, (measure, _, _) in checks.items()}
        seconds = {name: future.result() for name, future in futures.items()}
    for name, (_, low, high) in checks.items():
        assert low < seconds[name] < high, f"{name}: closed after {seconds[name]:.1f}s, not in ({low}, {high})"


# --- fuzzing the REST API from its OpenAPI schema -------------------------------------------------------------

# Cases per operation and mode (positive: what the schema allows; negative: what it does not). Positive image
# requests mostly pass validation and generate, so they are the expensive ones.
BUDGET = {
    "POST /v1/images/generations": (30, 265),
    "POST /v1/videos": (160, 225),
    "GET /v1/images/{job_id}/{index}": (70, 70),
    "GET /v1/videos/{job_id}": (70, 0),
    "DELETE /v1/videos/{job_id}": (70, 0),
    "GET /v1/videos/{job_id}/content": (70, 0),
    "GET /v1/models/{model}": (70, 0),
}
FUZZ_TIME_S = 120       # the whole run stops short of this even on a slow machine (15-30 s on 2 busy cores)


def test_fuzzed_rest_requests_never_get_a_5xx_or_hang(gateway):
    _, http_url, log = gateway
    schema = schemathesis.openapi.from_url(f"{http_url}/openapi.json")
    statuses: collections.Counter = collections.Counter()
    server_errors: list[str] = []
    session = requests.Session()        # one keep-alive connection, as a client would
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, count in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
                               BUDGET.get(operation.label, (1, 0)), strict=True):
            if not count or time.monotonic() - started > FUZZ_TIME_S:
                continue

            @seed(2026)
            @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=http_url, session=session, timeout=30)   # a hang fails here
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{case.method} {case.formatted_path} {case.body!r:.200}: "
                                         f"{response.status_code} {response.text[:200]}")

            try:
                call()
            except Unsatisfiable as error:       # say which operation's schema yields no case
                raise AssertionError(f"{operation.label} ({mode.name}): {error}") from None
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    print(f"REST fuzzing: {total} cases in {elapsed:.1f}s, by status: {dict(sorted(statuses.items()))}")
    assert server_errors == []
    assert total >= 1000 and elapsed < FUZZ_TIME_S + 30
    assert statuses[200] > 0                # some fuzzed requests passed validation and really generated
    assert httpx.get(f"{http_url}/v1/models", timeout=10).status_code == 200    # and the gateway still serves
    # Nothing this module sent made the gateway log an unhandled error.
    assert "Traceback" not in log.read_text()
