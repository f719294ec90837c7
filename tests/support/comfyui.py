"""Driving a real ComfyUI as a user would: the server (start.sh), the editor (browser_check.py in headless
Chromium), prompts over HTTP (run_prompt.py, /prompt, /history), and the harness's own Python (PyAV).

Needs a prepared harness (../shared/comfyui-harness/setup.sh): COMFYUI_HARNESS names its HARNESS_ROOT, with this
pack linked into ComfyUI/custom_nodes. The harness scripts are found in COMFYUI_HARNESS_SCRIPTS, else in
../shared/comfyui-harness beside this checkout. Output, input, temp and user folders are temporary; models are
read through --extra-model-paths-config, so nothing is left in the harness.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = os.environ.get("COMFYUI_HARNESS")
SKIP_REASON = (
    "COMFYUI_HARNESS is not set: point it at a prepared ComfyUI harness (HARNESS_ROOT of "
    "shared/comfyui-harness/setup.sh, this pack linked into custom_nodes) to run the real-ComfyUI tests"
)


class HarnessError(RuntimeError):
    """The harness is missing or broken (not a failure of the pack)."""


def scripts() -> Path:
    candidates = [os.environ.get("COMFYUI_HARNESS_SCRIPTS"), ROOT.parent / "shared" / "comfyui-harness"]
    for c in candidates:
        if c and (Path(c) / "start.sh").is_file():
            return Path(c)
    raise HarnessError(
        f"harness scripts (start.sh, run_prompt.py, browser_check.py) not found in {candidates}: set "
        "COMFYUI_HARNESS_SCRIPTS"
    )


def harness_root() -> Path:
    """The prepared harness, checked: ComfyUI, its venv, this checkout linked, Chromium installed."""
    harness = Path(HARNESS)
    if not (harness / "ComfyUI" / "main.py").is_file() or not (harness / "venv" / "bin" / "python").exists():
        raise HarnessError(f"COMFYUI_HARNESS={harness} is not a prepared harness (no ComfyUI/main.py or venv)")
    if not any(p.resolve() == ROOT for p in (harness / "ComfyUI" / "custom_nodes").iterdir()):
        raise HarnessError(f"this checkout ({ROOT}) is not linked into {harness}/ComfyUI/custom_nodes: run setup.sh")
    for tool in ("chromium", "chromedriver"):
        if not shutil.which(tool):
            raise HarnessError(f"{tool} is not installed (apt-get install -y chromium chromium-driver)")
    return harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, payload=None, timeout=30):
    """(status, JSON body) of one request."""
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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (already exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and alive(pid):
            time.sleep(0.1)
        if not alive(pid):
            return


# Runs in the editor page (browser_check.py --js) for each workflow: load it, list node types the editor does not
# know, export the API-format prompt (app.graphToPrompt) and a picture of the graph canvas, stored through ComfyUI's
# userdata API into the (temporary) user directory: --js prints only a short result.
EDITOR_JS = """
const registered = window.LiteGraph.registered_node_types || {};
const store = (file, body) => fetch("/api/userdata/" + encodeURIComponent("e2e/" + file), {method: "POST", body});
const out = {};
for (const [name, source] of %s) {
  const wf = typeof source === "string" ? await (await fetch(source)).json() : source;
  await window.app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 300));
  const nodes = window.app.graph._nodes;
  const api = (await window.app.graphToPrompt()).output;
  window.app.canvas.draw(true, true);
  const png = await new Promise(r => window.app.canvas.canvas.toBlob(r, "image/png"));
  const saved = [(await store(name + "_api.json", JSON.stringify(api))).status, (await store(name + "_canvas.png", png)).status];
  out[name] = {nodes: nodes.length, unknown: nodes.filter(n => !registered[n.type]).map(n => n.type), saved};
}
return out;
"""
WRITE_VIDEO = """
import sys, av, numpy as np
path, frames, size, fps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    for i in range(frames):
        a = np.zeros((size, size, 3), np.uint8)
        a[..., 0] = 20 * i
        a[8 * i : 8 * i + 16, :, 1] = 255
        for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(packet)
    for packet in s.encode():
        c.mux(packet)
"""
PROBE_VIDEO = """
import json, sys, av
with av.open(sys.argv[1]) as c:
    s = c.streams.video[0]
    n = sum(1 for _ in c.decode(video=0))
    print(json.dumps({"frames": n, "fps": float(s.average_rate), "size": [s.width, s.height], "codec": s.codec_context.name}))
"""


@dataclass
class ComfyServer:
    """A running ComfyUI server of the harness, with its temporary folders."""

    url: str
    pid: int
    log: Path
    work: Path  # holds output/, input/, temp/, user/
    harness: Path
    startup_s: float

    @classmethod
    def start(
        cls, work: Path, model_folders: dict[str, Path | list[Path]], extra_args: tuple[str, ...] = ()
    ) -> ComfyServer:
        """Start main.py --cpu on a free port; `model_folders`: model kind -> folder (or folders, searched in order),
        read as extra model paths."""
        harness = harness_root()
        yaml = work / "extra_model_paths.yaml"
        lines = ["metacanvas_e2e:"]
        for kind, folders in model_folders.items():
            if isinstance(folders, (list, tuple)):  # extra_model_paths.yaml: several folders, one per line
                lines += [f"  {kind}: |"] + [f"    {folder}" for folder in folders]
            else:
                lines.append(f"  {kind}: {folders}")
        yaml.write_text("\n".join(lines) + "\n")
        dirs = {name: work / name for name in ("output", "input", "temp", "user")}
        for d in dirs.values():
            d.mkdir(exist_ok=True)
        port = free_port()
        log = work / "comfyui.log"
        args = ["--extra-model-paths-config", str(yaml), "--database-url", "sqlite:///:memory:", *extra_args]
        for name, d in dirs.items():
            args += [f"--{name}-directory", str(d)]
        t0 = time.time()
        started = subprocess.run(
            [str(scripts() / "start.sh"), str(log), *args],
            env={**os.environ, "HARNESS_ROOT": str(harness), "COMFY_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=360,
        )
        if started.returncode != 0:
            raise HarnessError(f"ComfyUI did not start:\n{started.stderr[-4000:]}")
        pid = int(started.stdout.split()[-1])
        return cls(f"http://127.0.0.1:{port}", pid, log, work, harness, time.time() - t0)

    def stop(self) -> None:
        stop(self.pid)
        if alive(self.pid):
            raise HarnessError(f"ComfyUI (pid {self.pid}) did not stop")

    def http(self, method: str, path: str, payload=None, timeout=30):
        return http(method, f"{self.url}{path}", payload, timeout)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:]

    # --- the editor -----------------------------------------------------------------------
    def template_pack(self, names: list[str]) -> str:
        """The name ComfyUI's template browser lists `names` (workflow stems) under."""
        status, templates = self.http("GET", "/api/workflow_templates")
        assert status == 200, templates
        packs = [name for name, files in templates.items() if set(names) <= set(files)]
        assert packs, f"no pack lists {names}: {templates}"
        return packs[0]

    def load_in_editor(self, sources: list, artifacts: Path, nodes: list[str], first: Path | None = None) -> dict:
        """Each (name, workflow dict or URL path) loaded in one editor session, exported as API format.

        `first`: a workflow file loaded from disk before the others (its export and a screenshot of the editor are
        kept in `artifacts`). `nodes`: node types the editor must know. Returns {name: API prompt}."""
        cmd = [sys.executable, str(scripts() / "browser_check.py"), "--url", self.url]
        if first is not None:
            cmd += ["--load", str(first), "--api-out", str(artifacts / f"{first.stem}_api.json")]
            cmd += ["--out", str(artifacts / f"{first.stem}_editor.png")]
        else:  # browser_check.py's screenshot goes to ./browser_check.png unless told
            cmd += ["--out", str(artifacts / "editor.png")]
        cmd += ["--js", EDITOR_JS % json.dumps(sources)]
        for node in nodes:
            cmd += ["--node", node]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        report = res.stdout + res.stderr
        assert res.returncode == 0, f"browser_check failed (rc {res.returncode}):\n{report}"
        assert "MISSING" not in report and "unknown to the frontend" not in report, report
        result = next((line[len("   = ") :] for line in res.stdout.splitlines() if line.startswith("   = ")), None)
        assert result, f"the editor script returned nothing:\n{report}"
        summary = json.loads(result)
        assert set(summary) == {name for name, _ in sources}, report
        exported = {}
        stored = self.work / "user" / "default" / "e2e"
        for name, info in summary.items():
            assert info["unknown"] == [], f"{name}: node types unknown to the editor {info['unknown']}"
            assert info["saved"] == [200, 200], f"{name}: userdata POST answered {info['saved']}"
            for suffix in ("_api.json", "_canvas.png"):
                shutil.copy(stored / f"{name}{suffix}", artifacts / f"{name}{suffix}")
            exported[name] = json.loads((stored / f"{name}_api.json").read_text())
        return exported

    # --- prompts ----------------------------------------------------------------------------
    def run_prompt(self, api: dict, name: str, download: Path) -> tuple[int, str, dict]:
        """run_prompt.py --download: its exit code, its report and the /history entry."""
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(api))
        cmd = [sys.executable, str(scripts() / "run_prompt.py"), str(path), "--server", self.url]
        cmd += ["--download", str(download), "--timeout", "600"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=660)
        report = res.stdout + res.stderr
        entry = {}
        for line in res.stdout.splitlines():
            if line.startswith("prompt_id:"):
                pid = line.split()[1]
                _, hist = self.http("GET", f"/history/{pid}")
                entry = hist[pid]
        return res.returncode, report, entry

    def queue_and_wait(self, api: dict, timeout: float = 300) -> tuple[float, dict]:
        """POST /prompt, poll /history until the prompt is there: (wall seconds, history entry)."""
        t0 = time.perf_counter()
        status, body = self.http("POST", "/prompt", {"prompt": api, "client_id": "e2e"})
        assert status == 200, body
        pid = body["prompt_id"]
        while time.perf_counter() - t0 < timeout:
            _, hist = self.http("GET", f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                assert entry["status"]["status_str"] == "success", entry["status"]
                return time.perf_counter() - t0, entry
            time.sleep(0.005)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def submit(self, api: dict) -> tuple[int, dict]:
        """POST /prompt: (HTTP status, body); a prompt refused at validation answers 400 with node_errors."""
        return self.http("POST", "/prompt", {"prompt": api, "client_id": "e2e"})

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The /history entry of a queued prompt once it has finished, successfully or not."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            _, hist = self.http("GET", f"/history/{prompt_id}")
            if prompt_id in hist:
                return hist[prompt_id]
            if not alive(self.pid):
                raise HarnessError(f"ComfyUI died while running prompt {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def healthy(self) -> None:
        """The server answers and its queue is empty (nothing left running or stuck after a bad prompt)."""
        assert alive(self.pid), f"ComfyUI is gone:\n{self.log_tail()}"
        status, stats = self.http("GET", "/system_stats")
        assert status == 200 and stats["system"]["comfyui_version"], stats
        status, queue = self.http("GET", "/queue")
        assert status == 200 and queue["queue_running"] == [] and queue["queue_pending"] == [], queue

    # --- the harness's Python ---------------------------------------------------------------
    def python(self, code: str, *args: str) -> str:
        """Run code in the harness's venv (it has PyAV, ComfyUI's video library); return its stdout."""
        python = self.harness / "venv" / "bin" / "python"
        res = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    def write_video(self, path: Path, frames: int, size: int, fps: int) -> None:
        self.python(WRITE_VIDEO, str(path), str(frames), str(size), str(fps))

    def probe_video(self, path: Path) -> dict:
        return json.loads(self.python(PROBE_VIDEO, str(path)))


def ids(api: dict, kinds) -> set[str]:
    """Node ids of an API prompt whose class is in `kinds`."""
    return {nid for nid, node in api.items() if node["class_type"] in kinds}


def one(api: dict, kind: str) -> str:
    (nid,) = ids(api, {kind})
    return nid


def cached(entry: dict) -> set[str]:
    """Node ids a /history entry reports as taken from ComfyUI's cache."""
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def load_saved(folder: Path, images: list[dict]):
    """Saved PNGs (a /history output's "images") as uint8 arrays (N, H, W, 3)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for item in images:
        with Image.open(folder / item["filename"]) as im:
            assert im.format == "PNG" and im.mode == "RGB", (item, im.mode)
            arrays.append(np.asarray(im).copy())
    return np.stack(arrays)


def execution_errors(entry: dict) -> list[dict]:
    """The execution_error messages of a /history entry (node_id, node_type, exception_type, exception_message)."""
    return [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]


def validation_messages(body: dict, node: str) -> str:
    """A 400 answer's node_errors for one node, as one string (the input names and the nodes' own messages)."""
    errors = body.get("node_errors", {}).get(node, {}).get("errors", [])
    return " | ".join(
        f"{e.get('message')}: {e.get('details')} (input {e.get('extra_info', {}).get('input_name')})" for e in errors
    )


def write_png(path: Path, width: int, height: int, seed: int) -> Path:
    """A seeded random RGB PNG (a small input image for LoadImage)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def artifacts_dir(tmp_path_factory, name: str) -> Path:
    """Where a module keeps editor screenshots and saved outputs: $COMFYUI_E2E_OUT/<name>, else a pytest folder."""
    out = os.environ.get("COMFYUI_E2E_OUT")
    path = Path(out) / name if out else tmp_path_factory.mktemp(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def rewire(api: dict, node: str, through: str) -> dict:
    """The prompt without `node`: what read its first output now reads its input `through` (what bypassing a node
    in the editor sends; the input must have the output's type)."""
    api = json.loads(json.dumps(api))
    source = api.pop(node)["inputs"][through]
    for other in api.values():
        for name, value in other["inputs"].items():
            if value == [node, 0]:
                other["inputs"][name] = source
    return api
