"""The service's load generator (benchmarks/load_test.py): its clients against a live server
on the tiny model, its 503 handling and its report."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the service needs pyinv[serve]")
httpx = pytest.importorskip("httpx", reason="the service needs pyinv[serve]")
uvicorn = pytest.importorskip("uvicorn", reason="the service needs pyinv[serve]")

from pyinv.reports import write_json  # noqa: E402
from pyinv.serve.app import create_app  # noqa: E402
from pyinv.serve.engine import Engine, Limits  # noqa: E402
from pyinv.serve.store import InversionStore  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "load_test.py")


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("load_test", None)


@contextlib.contextmanager
def live_server(editor, root, port: int):
    """The app over ``editor`` served by uvicorn on 127.0.0.1:``port`` in a thread."""
    engine = Engine(editor, InversionStore(str(root)), Limits())
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and engine.ready):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def test_clients_against_a_live_server_and_the_report(load_test, editor, tmp_path):
    plan = load_test.Plan(clients=2, sessions=2, steps=2)
    with live_server(editor, tmp_path / "inversions", load_test.free_port()) as url:
        row = asyncio.run(load_test.measure(url, plan, pid=os.getpid()))
    assert row["errors"] == 0, row["error_samples"]
    assert row["sessions_done"] == 2 and row["sessions_failed"] == 0 and not row["time_capped"]
    assert row["inversions"] == 2 and row["edits"] == 2 * plan.edits
    assert row["requests"] == row["inversions"] + row["edits"] == 2 * (1 + plan.edits)
    assert row["cached_inversions"] == 0  # every session uploads its own image
    assert row["refused_503"] == 0 and row["retry_after_s"] == []
    for kind, n in (("invert", 2), ("edit", 6), ("session", 2)):
        lat = row["latency_s"][kind]
        assert lat["n"] == n and 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (kind, lat)
    assert row["edits_per_s"] > 0 and row["sessions_per_s"] > 0
    assert 1 <= row["max_batch_targets"] <= 2 and row["unet_batches"]["batches"] >= 1
    rss = row["rss_mib"]
    assert 0 < rss["start"] <= rss["peak_sampled"] and rss["end"] > 0 and rss["hwm"] > 0
    assert row["server"]["name"] == "tiny"

    row.update(mode="clients", queue_size=16, server_exit_code=0, server_exit_clean=True)
    rows = [row]
    load_test.add_ratios(rows)
    assert row["x_one_client"] is None  # no 1-client run
    args = load_test.parse_args(["--model", "tiny", "--clients", "2", "--sessions", "2", "--steps", "2"])
    path = tmp_path / "load.json"
    write_json(str(path), load_test.report(rows, args, ["--model", "tiny"]))
    written = json.loads(path.read_text())
    assert written["benchmark"] == "serve-load" and written["rows"][0]["edits"] == 6
    assert written["settings"]["clients"] == [2] and written["settings"]["steps"] == 2
    assert {"device", "threads", "commit", "versions"} <= set(written["provenance"])
    table = load_test.markdown(rows)
    assert len(table) == 3 and table[2].startswith("| 2 | 2 |")


def test_503_is_retried_after_retry_after_and_other_failures_are_errors(load_test):
    answers = iter([httpx.Response(503, headers={"Retry-After": "0"}), httpx.Response(200, json={"id": "x"})])
    plan = load_test.Plan(clients=1, sessions=1, max_retries=1)

    async def call(handler):
        tally = load_test.Tally()
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://127.0.0.1") as http:
            out = await load_test.request("invert", lambda: http.get("/"), plan, tally)
        return out, tally

    out, tally = asyncio.run(call(lambda request: next(answers)))
    assert out == {"id": "x"} and tally.refused["invert"] == 1 and tally.retry_after == {0.0} and not tally.errors
    out, tally = asyncio.run(call(lambda request: httpx.Response(503, headers={"Retry-After": "0"})))
    assert out is None and tally.refused["invert"] == 2 and "still 503" in tally.errors[0]
    out, tally = asyncio.run(call(lambda request: httpx.Response(504, json={"detail": "timed out"})))
    assert out is None and tally.errors == ['invert: HTTP 504: {"detail":"timed out"}'] and not tally.latency["invert"]


def test_inputs_differ_and_only_this_machine_is_targeted(load_test):
    images = load_test.session_images(20)
    assert len(set(images)) == 20
    assert load_test.check_local("http://localhost:8000") == "http://localhost:8000"
    for url in ("http://example.com", "http://10.0.0.1:8000", "http://127.0.0.1.example.com"):
        with pytest.raises(ValueError, match="127.0.0.1 or localhost only"):
            load_test.check_local(url)
    assert load_test.percentile([3.0, 1.0, 2.0], 50) == 2.0 and load_test.percentile([], 99) is None
