"""The editing service: every route, the limits, errors as JSON problems, the inversion cache
across a restart, concurrency, the Python client."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs pyinv[serve]")
pytest.importorskip("httpx", reason="the service needs pyinv[serve]")

from fastapi.testclient import TestClient  # noqa: E402

import pyinv  # noqa: E402
from pyinv.serve.app import PROBLEM, create_app  # noqa: E402
from pyinv.serve.engine import Engine, Job, Limits  # noqa: E402
from pyinv.serve.store import InversionStore  # noqa: E402

SRC = "a photo of a red ball"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def service(editor, root, limits=None, api_key=None) -> TestClient:
    engine = Engine(editor, InversionStore(root), limits or Limits())
    return TestClient(create_app(engine, api_key=api_key), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return tmp_path_factory.mktemp("inversions")


@pytest.fixture(scope="module")
def client(editor, store_root):
    with service(editor, store_root) as c:
        yield c


@pytest.fixture(scope="module")
def upload(image):
    return png_bytes(image)


def invert(client, upload, **fields):
    data = {"source_prompt": SRC, "steps": "3", **fields}
    return client.post("/v1/inversions", data=data, files={"image": ("in.png", upload, "image/png")})


def decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))


def assert_problem(response, status: int, *words: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and "Traceback" not in body["detail"]
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def test_health_readiness_models_metrics_and_schema(client, editor):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}  # warmed when the app started
    (model,) = client.get("/v1/models").json()["models"]
    assert model["name"] == "tiny" and model["backend"] == "eager" and model["image_size"] == editor.model.image_size
    schema = client.get("/openapi.json").json()
    edit = schema["components"]["schemas"]["EditRequest"]["properties"]
    assert {"inversion_id", "targets", "control", "guidance", "seed", "options"} <= set(edit)
    assert all(prop.get("description") for prop in edit.values())
    text = client.get("/metrics").text
    assert "pyinv_request_seconds_bucket" in text and "pyinv_queue_depth" in text


def test_invert_then_edit_and_the_same_upload_is_inverted_once(client, upload, editor):
    first = invert(client, upload)
    assert first.status_code == 200, first.text
    body = first.json()
    assert len(body["id"]) == 64 and body["cached"] is False and body["steps"] == 3
    assert body["psnr_db"] is None or body["psnr_db"] > 10  # Direct Inversion's source is exact (None = ∞)
    again = invert(client, upload).json()
    assert again["id"] == body["id"] and again["cached"] is True
    other = invert(client, upload, source_prompt="a photo of a ball").json()
    assert other["id"] != body["id"]

    edit = client.post(
        "/v1/edits",
        json={"inversion_id": body["id"], "targets": ["a photo of a blue ball", "a photo of a green ball"],
              "control": {"kind": "p2p", "blend": ["ball", "ball"]}},
    )  # fmt: skip
    assert edit.status_code == 200, edit.text
    out = edit.json()
    assert [i["prompt"] for i in out["images"]] == ["a photo of a blue ball", "a photo of a green ball"]
    side = editor.model.image_size
    assert all(decoded(i).size == (side, side) for i in out["images"])
    assert out["unet_image_forwards"] > 0 and out["timings"]["total_s"] >= out["timings"]["edit_s"] > 0
    # the same edit through the API directly gives the same pixels
    inv = editor.invert(Image.open(io.BytesIO(upload)), SRC, method="direct", steps=3)
    targets = ["a photo of a blue ball", "a photo of a green ball"]
    want = editor.edit(inv, targets, control=pyinv.P2P(blend=("ball", "ball")))
    for item, image in zip(out["images"], want.images, strict=True):
        assert decoded(item).tobytes() == image.tobytes()
    metrics = client.get("/metrics").text
    assert 'pyinv_inversion_cache_total{result="hit"}' in metrics and "pyinv_unet_image_forwards_total" in metrics

    info = client.get(f"/v1/inversions/{body['id']}").json()
    assert info["method"] == "direct" and info["source_prompt"] == SRC
    assert client.delete(f"/v1/inversions/{other['id']}").json() == {"deleted": other["id"]}
    assert_problem(client.get(f"/v1/inversions/{other['id']}"), 404)
    assert_problem(client.delete(f"/v1/inversions/{other['id']}"), 404)


def test_client_errors_are_json_problems(client, upload):
    inv_id = invert(client, upload).json()["id"]
    assert_problem(client.post("/v1/edits", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_problem(client.post("/v1/edits", json={"targets": ["x"]}), 422, "inversion_id")
    assert_problem(client.post("/v1/edits", json={"inversion_id": inv_id, "targets": []}), 422)
    assert_problem(client.post("/v1/edits", json={"inversion_id": "0" * 64, "targets": ["a"]}), 404, "no inversion")
    assert_problem(client.post("/v1/edits", json={"inversion_id": inv_id, "targets": ["a"] * 9}), 400, "at most 8")
    bad_control = {"inversion_id": inv_id, "targets": ["a photo"], "control": {"kind": "p2p", "bogus": 1}}
    assert_problem(client.post("/v1/edits", json=bad_control), 400)
    assert_problem(client.post("/v1/edits", json={**bad_control, "control": "nonsense"}), 400)
    assert_problem(invert(client, b"not an image"), 400, "not an image")
    assert_problem(invert(client, upload, options="{oops"), 400, "options is not JSON")
    assert_problem(invert(client, upload, method="no-such-method"), 400)
    assert_problem(invert(client, upload, steps="1000"), 400, "steps")
    assert_problem(invert(client, upload, source_prompt="x" * 1001), 400, "longer than")
    for bad in ("..%2F..%2Fetc%2Fpasswd", "a" * 63, "A" * 64, "g" * 64, "%00" + "a" * 61):
        assert client.get(f"/v1/inversions/{bad}").status_code in (400, 404)
    assert_problem(client.get("/v1/nothing-here"), 404)


def test_upload_and_pixel_limits(editor, tmp_path, image):
    limits = Limits(max_upload_bytes=4096, max_pixels=64 * 64)
    with service(editor, tmp_path, limits) as c:
        import numpy as np

        noise = np.random.RandomState(0).randint(0, 256, (200, 200, 3), dtype=np.uint8)
        huge = png_bytes(Image.fromarray(noise))  # refused from its Content-Length, unread
        assert len(huge) > 4096 + (64 << 10)
        assert_problem(invert(c, huge), 413)
        big = png_bytes(Image.fromarray(noise[:40, :40]))  # under the header's slack: refused once read
        assert 4096 < len(big) < 4096 + (64 << 10)
        assert_problem(invert(c, big), 413)
        # a small file that decodes to more pixels than allowed (a decompression bomb in miniature)
        flat = png_bytes(Image.new("RGB", (200, 200), (10, 20, 30)))
        assert len(flat) < 4096
        assert_problem(invert(c, flat), 400, "too large")


def test_bearer_token(editor, tmp_path, upload):
    with service(editor, tmp_path, api_key="s3cret") as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert_problem(c.get("/v1/models"), 401, "bearer")
        assert_problem(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert_problem(invert(c, upload), 401)


def test_a_full_queue_answers_503_with_retry_after_and_a_slow_job_504(editor, tmp_path):
    release = threading.Event()
    with service(editor, tmp_path, Limits(queue_size=1, request_timeout_s=0.5)) as c:
        engine = c.app.state.engine
        running = threading.Event()

        def hold():
            running.set()
            release.wait()

        blocker = engine._submit(Job(hold)).future
        assert running.wait(10)  # the worker is busy
        queued = engine._submit(Job(lambda: None)).future  # the one queue slot is taken
        try:
            r = c.post("/v1/edits", json={"inversion_id": "0" * 64, "targets": ["a"]})
            assert_problem(r, 503, "queue is full")
            assert r.headers["retry-after"] == "2"
        finally:
            release.set()
            blocker.result(10)
            queued.result(10)
        release.clear()
        running.clear()
        slow = engine._submit(Job(hold)).future
        assert running.wait(10)
        r = c.post("/v1/edits", json={"inversion_id": "0" * 64, "targets": ["a"]})
        release.set()
        slow.result(10)
        assert_problem(r, 504, "longer than")
        assert c.get("/readyz").status_code == 200  # the worker survived


def test_a_failing_job_does_not_take_the_worker_down(client, upload, monkeypatch):
    inv_id = invert(client, upload).json()["id"]
    engine = client.app.state.engine

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    with monkeypatch.context() as mp:
        mp.setattr(engine.editor, "edit", boom)
        r = client.post("/v1/edits", json={"inversion_id": inv_id, "targets": ["a photo"]})
        body = assert_problem(r, 500)
        assert "kaboom" not in body["detail"]
    ok = client.post("/v1/edits", json={"inversion_id": inv_id, "targets": ["a photo"]})
    assert ok.status_code == 200


def test_concurrent_requests_give_the_serial_images(client, upload):
    """Concurrent edits of one inversion: each gets its own target's image, the image it gets
    alone (within one 8-bit level: a batched UNet row rounds slightly differently on the CPU),
    and edits waiting together were batched."""
    import numpy as np

    inv_id = invert(client, upload).json()["id"]
    targets = ["a photo of a blue ball", "a photo of a green ball", "a photo of a red cube"]

    def edit(target):
        r = client.post("/v1/edits", json={"inversion_id": inv_id, "targets": [target], "control": "p2p"})
        assert r.status_code == 200, r.text
        (image,) = r.json()["images"]
        assert image["prompt"] == target
        return np.asarray(decoded(image), dtype=np.int16), r.json()["batch_targets"]

    serial = [edit(t)[0] for t in targets]
    release = threading.Event()
    engine = client.app.state.engine
    hold = engine._submit(Job(release.wait)).future  # the edits below queue up behind it
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(edit, t) for t in targets * 2]
        while engine.queue_depth < 6:
            threading.Event().wait(0.01)
        release.set()
        together = [f.result() for f in futures]
    hold.result(10)
    for i, (image, batch) in enumerate(together):
        assert np.abs(image - serial[i % 3]).max() <= 1
        assert batch == 6  # all six waited together: one edit of six targets


def test_concurrent_edits_of_different_inversions_share_the_unet_calls(client, upload, image):
    """Edits of two uploads queued together run as one shared edit (``batch_edits`` 2, one
    UNet call per step for both) and give the images each gets alone."""
    import numpy as np

    other = png_bytes(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    ids = [invert(client, upload).json()["id"], invert(client, other).json()["id"]]
    assert ids[0] != ids[1]
    jobs = [(ids[0], "a photo of a blue ball"), (ids[1], "a photo of a green ball"), (ids[0], "a photo of a cube")]

    def edit(job):
        inv_id, target = job
        r = client.post("/v1/edits", json={"inversion_id": inv_id, "targets": [target], "control": "p2p"})
        assert r.status_code == 200, r.text
        return np.asarray(decoded(r.json()["images"][0]), dtype=np.int16), r.json()

    serial = [edit(job)[0] for job in jobs]
    release = threading.Event()
    engine = client.app.state.engine
    hold = engine._submit(Job(release.wait)).future
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(edit, job) for job in jobs]
        while engine.queue_depth < 3:
            threading.Event().wait(0.01)
        release.set()
        together = [f.result() for f in futures]
    hold.result(10)
    for (image, body), alone in zip(together, serial, strict=True):
        assert np.abs(image - alone).max() <= 1
        assert body["batch_edits"] == 2 and body["batch_targets"] == 3
    # one inversion's two edits became one edit of two targets: its UNet rows count both
    assert together[0][1]["unet_image_forwards"] == together[2][1]["unet_image_forwards"]
    assert together[0][1]["unet_image_forwards"] > together[1][1]["unet_image_forwards"]


def test_concurrent_inversions_share_the_unet_calls(editor, tmp_path, image):
    """Three uploads inverted at once (Direct Inversion) are one batched DDIM inversion
    (``batch_inversions`` 3) with the pivots each gets alone."""
    uploads = [png_bytes(image.rotate(angle)) for angle in (0, 90, 180)]
    with service(editor, tmp_path) as c:
        engine = c.app.state.engine
        release = threading.Event()
        hold = engine._submit(Job(release.wait)).future
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(invert, c, data) for data in uploads]
            while engine.queue_depth < 3:
                threading.Event().wait(0.01)
            release.set()
            bodies = [f.result().json() for f in futures]
        hold.result(10)
        for body, data in zip(bodies, uploads, strict=True):
            assert body["batch_inversions"] == 3 and body["cached"] is False
            stored = engine.store.get(body["id"])
            alone = editor.invert(Image.open(io.BytesIO(data)), SRC, method="direct", steps=3)
            assert float((stored["trajectory"] - alone["trajectory"]).abs().max()) <= 1e-4
        again = invert(c, uploads[1]).json()  # the same upload again: from the store
        assert again["id"] == bodies[1]["id"] and again["cached"] is True


def test_a_restarted_service_finds_its_inversions_on_disk(editor, tmp_path, upload):
    with service(editor, tmp_path) as c:
        inv_id = invert(c, upload).json()["id"]
        before = c.post("/v1/edits", json={"inversion_id": inv_id, "targets": ["a photo of a blue ball"]}).json()
    with service(editor, tmp_path) as c:  # a new process would see the same
        again = invert(c, upload).json()
        assert again["id"] == inv_id and again["cached"] is True
        after = c.post("/v1/edits", json={"inversion_id": inv_id, "targets": ["a photo of a blue ball"]}).json()
    assert after["images"] == before["images"]


def test_the_python_client(client, upload):
    with pyinv.Client(http=client) as api:
        assert api.ready() and api.models()["models"][0]["name"] == "tiny"
        inv = api.invert(upload, SRC, steps=3)
        out = api.edit(inv["id"], "a photo of a blue ball", control="p2p")
        assert out["images"][0]["image"].size[0] == out["images"][0]["image"].size[1]
        assert api.inversion(inv["id"])["steps"] == 3
        with pytest.raises(pyinv.PyinvError, match="404"):
            api.edit("0" * 64, "a")


def test_serve_command_line_usage_errors(capsys):
    from pyinv import cli

    assert cli.main(["serve", "--help"]) == 0
    assert "/v1/inversions" in capsys.readouterr().out
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli.main(["serve", "--max-batch-targets", "0"]) == 2  # 1 turns batching off; 0 is no count

    from pyinv.cli.serve import limits_of

    args = cli.build_parser().parse_args(["serve", "--max-batch-targets", "1", "--queue-size", "3"])
    assert (limits_of(args).max_batch_targets, limits_of(args).queue_size) == (1, 3)
    assert limits_of(cli.build_parser().parse_args(["serve"])).max_batch_targets == 8


def test_sigterm_drains_the_request_in_flight(tmp_path, upload):
    """A live ``pyinv serve``: SIGTERM while an inversion runs lets it finish (200), the
    process then exits, and the cache holds the whole file and no partial one."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "pyinv", "serve", "--model", "tiny", "--port", str(port), "--cache-dir", str(cache)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            raise AssertionError("the service did not get ready")
        result = {}

        def slow_inversion():
            fields = {"source_prompt": SRC, "steps": "60", "method": "null-text", "options": '{"inner_steps": 2}'}
            files = {"image": ("in.png", upload, "image/png")}
            result["response"] = httpx.post(f"{url}/v1/inversions", data=fields, files=files, timeout=120)

        worker = threading.Thread(target=slow_inversion)
        worker.start()
        time.sleep(1.5)  # the inversion is running
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        # uvicorn shuts down gracefully, then ends by the signal it caught (the conventional status)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        response = result["response"]
        assert response.status_code == 200, response.text
        files = sorted(p.name for p in cache.iterdir())
        assert files == [f"{response.json()['id']}.safetensors"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_engine_loads_its_model_on_the_worker_thread(editor, tmp_path):
    """Given a loader, the engine calls it on its worker thread (which then runs the model);
    a loader's error comes out of ``start``."""
    threads = []

    def load():
        threads.append(threading.current_thread().name)
        return editor

    engine = Engine(load, InversionStore(tmp_path / "a"))
    assert engine.editor is None
    engine.start(warm=False)
    try:
        assert engine.editor is editor and threads == ["pyinv-engine"]
    finally:
        engine.stop()

    def broken():
        raise pyinv.PyinvError("model folder not found: nowhere")

    engine = Engine(broken, InversionStore(tmp_path / "b"))
    with pytest.raises(pyinv.PyinvError, match="model folder not found"):
        engine.start()
    engine.stop()
