"""Scale-out with Ray Serve: two CPU replicas of the tiny model on a local Ray instance, over
HTTP; the deployment's options; the command line's refusals (without starting Ray).

The replicas' test starts Ray once (marked ``ray``: ``-m "not ray"`` leaves it out). On the
2-core machine it takes about 35-45 s: some 10 s to start Ray, 15 s for the two replicas to
load and warm the model, a few seconds of requests and the shutdown.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from pyinv import cli

pytest.importorskip("fastapi", reason="the service needs pyinv[serve]")

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve is not installed (pip install 'pyinv[ray]')")
# Ray Serve's own pydantic models, as they import, warn about a pydantic 2 deprecation
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")
SRC = "a photo of a red ball"
PROBLEM = "application/problem+json"
HEADER = "x-pyinv-replica"


# ---------------------------------------------------------------------- the command line (no Ray started)
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--replicas", "2"], "--replicas needs --ray"),
        (["--ray-address", "auto"], "--ray-address needs --ray"),
        (["--num-cpus-per-replica", "0.5"], "--num-cpus-per-replica needs --ray"),
        (["--max-replicas", "3"], "--max-replicas needs --ray"),
        (["--ray", "--min-replicas", "2"], "give --max-replicas too"),
        (["--ray", "--target-ongoing-requests", "4"], "give --max-replicas too"),
        (["--ray", "--replicas", "2", "--max-replicas", "3"], "not both"),
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "more than --max-replicas"),
        (["--ray", "--device", "cuda:1"], "not cuda:N"),
        (["--ray", "--replicas", "0"], "positive integer"),
        (["--ray", "--num-cpus-per-replica", "-1"], "positive number"),
    ],
)
def test_ray_usage_errors(argv, words, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # nothing may reach Ray: importing it fails
    assert cli.main(["serve", "--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_ray_missing_is_one_clear_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    assert cli.main(["serve", "--ray", "--replicas", "2", "--model", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "pyinv: error: pyinv serve --ray needs the ray extra: pip install 'pyinv[ray]'"


def test_serve_help_lists_the_ray_flags(capsys):
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--ray", "--replicas", "--ray-address", "--num-cpus-per-replica", "--max-replicas"):
        assert flag in out


@needs_ray
@pytest.mark.parametrize("when", ["running", "starting"])
def test_the_ray_command_starts_deploys_and_shuts_down(when, monkeypatch, tmp_path, capsys):
    """``pyinv serve --ray`` with Ray's calls replaced: the settings and the scaling it asks
    for, and SIGTERM, while running or while the replicas start, takes everything down."""
    import signal

    import ray
    from ray import serve

    from pyinv.serve import ray_app

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("ray.shutdown",)))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append(("serve.shutdown",)))
    monkeypatch.setattr(ray_app, "application", lambda *a: calls.append(("application", *a)) or "app")

    def deploy(app, host, port):
        calls.append(("deploy", app, host, port))
        if when == "starting":
            signal.raise_signal(signal.SIGTERM)
        else:
            threading.Timer(0.3, signal.raise_signal, (signal.SIGTERM,)).start()

    monkeypatch.setattr(ray_app, "deploy", deploy)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["serve", "--ray", "--max-replicas", "3", "--num-cpus-per-replica", "0.5", "--model", "tiny"]
    assert cli.main([*argv, "--port", "8123", "--cache-dir", str(tmp_path)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    (init, application, deployed, *down) = calls
    assert init == ("init", {"address": "local"})
    _, settings, replicas, num_cpus, scaling = application
    assert settings.model == "tiny" and settings.device == "cpu" and settings.store_root == str(tmp_path)
    assert settings.threads == 1 and settings.api_key is None
    assert (replicas, num_cpus) == (1, 0.5)
    assert scaling == ray_app.Autoscaling(min_replicas=1, max_replicas=3, target_ongoing_requests=2.0)
    assert deployed == ("deploy", "app", "127.0.0.1", 8123)
    assert down == [("serve.shutdown",), ("ray.shutdown",)]
    out = capsys.readouterr().out
    assert ("1-3 replica(s) of tiny on cpu" in out) == (when == "running")


# ---------------------------------------------------------------------- the deployment, without running it
@needs_ray
def test_deployment_options():
    from pyinv.serve import ray_app
    from pyinv.serve.engine import Limits

    cpu = ray_app.ReplicaSettings(model="tiny", device="cpu", limits=Limits(queue_size=5, request_timeout_s=60))
    opts = ray_app.deployment_options(cpu, replicas=3, num_cpus=0.5)
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"] == {"num_cpus": 0.5}
    assert opts["max_ongoing_requests"] == 6 and opts["graceful_shutdown_timeout_s"] == 60
    assert "autoscaling_config" not in opts
    gpu = ray_app.ReplicaSettings(model="tiny", device="cuda")
    scaling = ray_app.Autoscaling(min_replicas=1, max_replicas=4, target_ongoing_requests=3)
    opts = ray_app.deployment_options(gpu, autoscaling=scaling)
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}  # one GPU per replica
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    assert "num_replicas" not in opts
    ray_app.application(gpu, autoscaling=scaling)  # Ray accepts the options


@needs_ray
def test_a_replica_that_cannot_start_is_reported_in_one_line(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    from pyinv.serve import ray_app

    message = (
        "The deployment failed to start 3 times in a row. ... Error:\nTraceback (most recent call last):\n"
        '  File "pyinv/models.py", line 338, in load_model\n'
        "pyinv.errors.PyinvError: model folder not found: /nowhere\n"
    )
    deployment = SimpleNamespace(message=message)
    status = SimpleNamespace(
        applications={"pyinv": SimpleNamespace(message="failed", deployments={"pyinv": deployment})}
    )
    monkeypatch.setattr(serve, "status", lambda: status)
    assert ray_app.failure_reason() == "model folder not found: /nowhere"
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={}))
    assert ray_app.failure_reason() is None


@needs_ray
def test_the_health_check_fails_without_the_engine_worker(editor):
    from pyinv.serve import ray_app
    from pyinv.serve.engine import Engine
    from pyinv.serve.store import InversionStore

    engine = Engine(editor, InversionStore(None))
    with pytest.raises(RuntimeError, match="worker"):
        ray_app.check_engine(engine)  # not started
    engine.start(warm=False)
    ray_app.check_engine(engine)
    engine.stop()
    with pytest.raises(RuntimeError, match="worker"):
        ray_app.check_engine(engine)


# ---------------------------------------------------------------------- two replicas on a local Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib_of_descendants() -> float | None:
    """The resident memory of this process's descendants (Ray's processes), MiB (Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    try:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            pid = int(name)
            children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    except OSError:
        return None
    total, todo = 0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory):
    """Two CPU replicas (half a core each) of the tiny model behind Ray Serve's proxy on a free
    localhost port, sharing one inversion folder; Ray is shut down afterwards."""
    if not HAVE_RAY:
        pytest.skip("Ray Serve is not installed (pip install 'pyinv[ray]')")
    import ray
    from ray import serve

    from pyinv.serve import ray_app

    timings = {}
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",  # a new instance, never one that happens to run on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100 << 20,
            log_to_driver=False,
        )
        try:
            timings["ray_start_s"] = time.perf_counter() - start
            port = _free_port()
            settings = ray_app.ReplicaSettings(
                model="tiny", device="cpu", store_root=str(tmp_path_factory.mktemp("shared-inversions")), threads=1
            )
            ray_app.deploy(ray_app.application(settings, replicas=2, num_cpus=0.5), "127.0.0.1", port)
            timings["replicas_up_s"] = time.perf_counter() - start - timings["ray_start_s"]
            yield {"url": f"http://127.0.0.1:{port}", "timings": timings}
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))


@needs_ray
@pytest.mark.ray
def test_two_replicas_serve_the_app_and_share_the_inversions(ray_service, image, editor, record_property):
    import httpx

    url, timings = ray_service["url"], ray_service["timings"]
    start = time.perf_counter()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    upload = buf.getvalue()
    side = editor.model.image_size

    with httpx.Client(base_url=url, timeout=120) as http:
        # health and readiness: both replicas were warmed before Ray routed to them
        assert http.get("/healthz").json() == {"status": "ok"}
        seen = set()
        for _ in range(200):  # Ray picks a replica per request: soon both have answered
            response = http.get("/readyz")
            assert response.status_code == 200 and response.json() == {"status": "ready"}, response.text
            seen.add(response.headers[HEADER])
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"only replica {seen} answered"
        (model,) = http.get("/v1/models").json()["models"]
        assert model["name"] == "tiny" and model["device"] == "cpu"

        # invert, then edit with two targets
        def invert():
            files = {"image": ("in.png", upload, "image/png")}
            return http.post("/v1/inversions", data={"source_prompt": SRC, "steps": "3"}, files=files)

        first = invert()
        assert first.status_code == 200, first.text
        inversion, inverter = first.json()["id"], first.headers[HEADER]
        targets = ["a photo of a blue ball", "a photo of a green ball"]
        edit = http.post("/v1/edits", json={"inversion_id": inversion, "targets": targets, "control": "p2p"})
        assert edit.status_code == 200, edit.text
        images = edit.json()["images"]
        assert [i["prompt"] for i in images] == targets
        assert all(_decoded(i).size == (side, side) for i in images)

        # edits of that inversion on either replica: the other one finds it in the shared folder
        def one_edit(k: int):
            return http.post("/v1/edits", json={"inversion_id": inversion, "targets": [f"a photo of ball {k}"]})

        with ThreadPoolExecutor(2) as pool:
            edits = list(pool.map(one_edit, range(12)))
        assert [r.status_code for r in edits] == [200] * len(edits), [r.text for r in edits if r.status_code != 200]
        editors = {r.headers[HEADER] for r in edits}
        assert editors - {inverter}, f"every edit went to the replica that inverted ({inverter})"
        # the same upload again, answered by the other replica, is found inverted
        for _ in range(20):
            again = invert()
            assert again.status_code == 200, again.text
            if again.headers[HEADER] != inverter:
                body = again.json()
                assert body["id"] == inversion and body["cached"] is True, body
                break
        else:
            raise AssertionError("no inversion request reached the other replica")

        # client errors are JSON problems through Ray's proxy too
        for response, status in (
            (http.post("/v1/edits", json={"inversion_id": "../etc/passwd", "targets": ["x"]}), 400),
            (http.post("/v1/edits", json={"inversion_id": inversion, "targets": []}), 422),
            (http.get(f"/v1/inversions/{'0' * 64}"), 404),
        ):
            assert response.status_code == status, response.text
            assert response.headers["content-type"].startswith(PROBLEM)
            assert "Traceback" not in response.json()["detail"]

        # a delete on one replica is seen by both (the other held it in memory)
        assert http.delete(f"/v1/inversions/{inversion}").json() == {"deleted": inversion}
        answered = set()
        for _ in range(12):
            response = http.get(f"/v1/inversions/{inversion}")
            assert response.status_code == 404, response.text
            answered.add(response.headers[HEADER])
        assert len(answered) == 2

    timings["requests_s"] = time.perf_counter() - start
    rss = _rss_mib_of_descendants()
    if rss is not None:
        timings["ray_rss_mib"] = rss
    for key, value in timings.items():
        record_property(key, round(value, 1))
    print("Ray Serve test:", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
