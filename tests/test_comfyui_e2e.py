"""End to end in a real ComfyUI: the shipped workflow loads in the editor and runs on the server.

Needs a prepared harness (../shared/comfyui-harness/setup.sh): set COMFYUI_HARNESS to its HARNESS_ROOT, with
this pack linked into ComfyUI/custom_nodes. The harness scripts are found in COMFYUI_HARNESS_SCRIPTS, else in
../shared/comfyui-harness beside this checkout. Tiny models go to a temporary folder that ComfyUI reads
through --extra-model-paths-config; output, input, temp and user folders are temporary too, so nothing is
left in the harness. Set COMFYUI_E2E_OUT to keep the editor screenshot and images somewhere.

    COMFYUI_HARNESS=/path/to/harness python -m pytest tests/test_comfyui_e2e.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = os.environ.get("COMFYUI_HARNESS")
WORKFLOW = ROOT / "workflows" / "text_to_image.json"
PACK_NODES = [
    "MetaCanvasMLLMLoader",
    "MetaCanvasBackboneLoader",
    "MetaCanvasConnectorLoader",
    "MetaCanvasPlan",
    "MetaCanvasProject",
    "MetaCanvasSampler",
    "MetaCanvasDecode",
]
PLANNING = {"MetaCanvasMLLMLoader", "MetaCanvasBackboneLoader", "MetaCanvasConnectorLoader", "MetaCanvasPlan"}

pytestmark = pytest.mark.skipif(
    not HARNESS,
    reason="COMFYUI_HARNESS is not set: point it at a prepared ComfyUI harness (HARNESS_ROOT of "
    "shared/comfyui-harness/setup.sh, this pack linked into custom_nodes) to run the real-ComfyUI tests",
)


def _scripts() -> Path:
    candidates = [os.environ.get("COMFYUI_HARNESS_SCRIPTS"), ROOT.parent / "shared" / "comfyui-harness"]
    for c in candidates:
        if c and (Path(c) / "start.sh").is_file():
            return Path(c)
    pytest.fail(
        f"harness scripts (start.sh, run_prompt.py, browser_check.py) not found in {candidates}: set COMFYUI_HARNESS_SCRIPTS"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, payload=None, timeout=30):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"raw": body.decode(errors="replace")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (already exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _stop(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            return


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = os.environ.get("COMFYUI_E2E_OUT")
    path = Path(out) if out else tmp_path_factory.mktemp("comfyui_e2e_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """A real ComfyUI (start.sh) on a free port, reading the tiny models; killed at the end."""
    harness = Path(HARNESS)
    main_py = harness / "ComfyUI" / "main.py"
    if not main_py.is_file() or not (harness / "venv" / "bin" / "python").exists():
        pytest.fail(f"COMFYUI_HARNESS={harness} is not a prepared harness (no ComfyUI/main.py or venv): run setup.sh")
    linked = [p for p in (harness / "ComfyUI" / "custom_nodes").iterdir() if p.resolve() == ROOT]
    if not linked:
        pytest.fail(
            f"this checkout ({ROOT}) is not linked into {harness}/ComfyUI/custom_nodes: run setup.sh with EXTENSION={ROOT}"
        )
    for tool in ("chromium", "chromedriver"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (apt-get install -y chromium chromium-driver)")
    scripts = _scripts()

    work = tmp_path_factory.mktemp("comfyui")
    yaml = work / "extra_model_paths.yaml"
    yaml.write_text(
        f"metacanvas_e2e:\n  base_path: {models_dir}\n  LLM: LLM\n  diffusers: diffusers\n  metacanvas: metacanvas\n"
    )
    dirs = {name: work / name for name in ("output", "input", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    port = _free_port()
    log = work / "comfyui.log"
    args = ["--extra-model-paths-config", str(yaml), "--database-url", "sqlite:///:memory:"]
    for name, d in dirs.items():
        args += [f"--{name}-directory", str(d)]
    t0 = time.time()
    started = subprocess.run(
        [str(scripts / "start.sh"), str(log), *args],
        env={**os.environ, "HARNESS_ROOT": str(harness), "COMFY_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=360,
    )
    if started.returncode != 0:
        pytest.fail(f"ComfyUI did not start:\n{started.stderr[-4000:]}")
    pid = int(started.stdout.split()[-1])
    url = f"http://127.0.0.1:{port}"
    info = {"url": url, "pid": pid, "log": log, "scripts": scripts, "work": work, "startup_s": time.time() - t0}
    try:
        _, object_info = _http("GET", f"{url}/object_info")
        missing = [n for n in PACK_NODES if n not in object_info]
        assert not missing, f"the pack's nodes {missing} are not registered:\n{log.read_text()[-4000:]}"
        yield info
    finally:
        _stop(pid)
        assert not _alive(pid), f"ComfyUI (pid {pid}) did not stop"


@pytest.fixture(scope="module")
def api_prompt(server, artifacts) -> dict:
    """The workflow loaded in the real editor, exported as an API-format prompt."""
    api_out = artifacts / "text_to_image_api.json"
    cmd = [sys.executable, str(server["scripts"] / "browser_check.py"), "--url", server["url"], "--load", str(WORKFLOW)]
    cmd += ["--api-out", str(api_out), "--out", str(artifacts / "text_to_image_editor.png")]
    for node in PACK_NODES + ["SaveImage"]:
        cmd += ["--node", node]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = res.stdout + res.stderr
    assert res.returncode == 0, f"browser_check failed (rc {res.returncode}):\n{report}"
    assert "MISSING" not in report and "unknown to the frontend" not in report, report
    with open(api_out) as f:
        return json.load(f)


def tiny(api: dict, seed: int | None = None, width: int = 64) -> dict:
    """The exported prompt pointed at the tiny models, 64x64, 2 steps."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "MetaCanvasMLLMLoader":
            inputs["mllm_folder"] = "tiny-qwen2_5-vl"
        elif kind == "MetaCanvasBackboneLoader":
            inputs["backbone_folder"] = "tiny-sana"
        elif kind == "MetaCanvasPlan":
            inputs.update(width=64, height=64)
        elif kind == "MetaCanvasSampler":
            inputs.update(width=width, height=64, steps=2)
            if seed is not None:
                inputs["seed"] = seed
    return api


def run_prompt(server, api: dict, name: str, download: Path) -> tuple[int, str, dict]:
    """run_prompt.py --download; returns its exit code, its report and the /history entry."""
    path = server["work"] / f"{name}.json"
    path.write_text(json.dumps(api))
    cmd = [sys.executable, str(server["scripts"] / "run_prompt.py"), str(path), "--server", server["url"]]
    res = subprocess.run(
        cmd + ["--download", str(download), "--timeout", "300"], capture_output=True, text=True, timeout=360
    )
    report = res.stdout + res.stderr
    entry = {}
    for line in res.stdout.splitlines():
        if line.startswith("prompt_id:"):
            pid = line.split()[1]
            _, hist = _http("GET", f"{server['url']}/history/{pid}")
            entry = hist[pid]
    return res.returncode, report, entry


def _ids(api: dict, kinds) -> set[str]:
    return {nid for nid, node in api.items() if node["class_type"] in kinds}


def _cached(entry: dict) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def test_editor_loads_the_workflow(api_prompt):
    kinds = sorted(node["class_type"] for node in api_prompt.values())
    assert kinds == sorted(PACK_NODES + ["SaveImage"])  # the Note is the editor's own, never sent
    sampler = api_prompt[next(iter(_ids(api_prompt, {"MetaCanvasSampler"})))]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["scheduler"], sampler["use_canvas"]) == (
        20,
        4.5,
        "dpm_solver_flow",
        True,
    )


def test_workflow_makes_an_image(server, api_prompt, artifacts):
    from PIL import Image

    t0 = time.time()
    rc, report, entry = run_prompt(server, tiny(api_prompt), "first", artifacts / "first")
    assert rc == 0, report
    pngs = sorted((artifacts / "first").glob("*.png"))
    assert pngs, report
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    print(f"first run {time.time() - t0:.1f}s (server start {server['startup_s']:.1f}s)")


def test_seed_change_reruns_only_the_sampler(server, api_prompt, artifacts):
    base = tiny(api_prompt, seed=1)
    rc, report, _ = run_prompt(server, base, "seed1", artifacts / "seed1")
    assert rc == 0, report
    rc, report, entry = run_prompt(server, tiny(api_prompt, seed=2), "seed2", artifacts / "seed2")
    assert rc == 0, report
    cached = _cached(entry)
    print(f"seed change: cached {sorted(cached, key=int)} of {sorted(base, key=int)}")
    assert _ids(base, PLANNING | {"MetaCanvasProject"}) <= cached, f"cached: {cached}\n{report}"
    assert not _ids(base, {"MetaCanvasSampler", "MetaCanvasDecode", "SaveImage"}) & cached, f"cached: {cached}"
    (one,), (two,) = (list((artifacts / d).glob("*.png")) for d in ("seed1", "seed2"))
    assert one.read_bytes() != two.read_bytes(), "a new seed gave the same image"


def test_bad_width_is_rejected_and_server_survives(server, api_prompt):
    status, body = _http("POST", f"{server['url']}/prompt", {"prompt": tiny(api_prompt, width=50), "client_id": "e2e"})
    assert status == 400, body
    sampler = next(iter(_ids(api_prompt, {"MetaCanvasSampler"})))
    assert sampler in body["node_errors"], body
    messages = " ".join(f"{e.get('message')} {e.get('details')}" for e in body["node_errors"][sampler]["errors"])
    assert "width 50" in messages and "multiple of" in messages, messages
    print(f"width 50 rejected: {messages}")
    status, stats = _http("GET", f"{server['url']}/system_stats")
    assert status == 200 and stats["system"]["comfyui_version"]
    status, queue = _http("GET", f"{server['url']}/queue")
    assert status == 200 and queue["queue_running"] == [] and queue["queue_pending"] == []


def test_workflow_is_listed_as_a_template(server):
    status, templates = _http("GET", f"{server['url']}/api/workflow_templates")
    assert status == 200
    packs = [name for name, files in templates.items() if "text_to_image" in files]
    assert packs, templates
    status, served = _http("GET", f"{server['url']}/api/workflow_templates/{packs[0]}/text_to_image.json")
    assert status == 200 and served == json.loads(WORKFLOW.read_text())
