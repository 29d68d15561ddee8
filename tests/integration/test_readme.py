"""The README's commands, run as written: every block marked
``<!-- tests/integration/test_readme.py runs this block as written -->`` is run here through bash,
word for word, in a fresh folder with the project's venv on PATH (as after `. .venv/bin/activate`).
Only what cannot be here is a stand-in: NeMo Gym (``ng_run``/``ng_collect_rollouts``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.models import default_cache_dir
from server.registry import Registry
from server.verify import readiness_checks
from tests.support import ROOT, SLURM_SCRIPTS, assert_run_left_nothing, gym_standins

MARK = "<!-- tests/integration/test_readme.py runs this block as written -->"


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = []
    for part in text.split(MARK)[1:]:
        found = re.match(r"\s*```\w*\n(.*?)```", part, re.S)
        assert found, f"a {MARK} line not followed by a fenced block"
        blocks.append(found.group(1))
    return blocks


def block_with(fragment: str) -> str:
    (block,) = [b for b in readme_blocks() if fragment in b]
    return block


@pytest.fixture
def shell(tmp_path):
    """A user's shell: the venv active, a home of its own (the model cache kept), a registry root."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "GYMLAUNCH_CACHE": str(default_cache_dir().parent),  # the embedded model, converted once
        "GYMLAUNCH_REGISTRY_ROOT": str(tmp_path / "registry"),
    }
    env.pop("GYMLAUNCH_NAMESPACE", None)
    return home, work, env


def bash(block: str, cwd: Path, env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def test_every_marked_block_is_one_this_module_runs():
    blocks = readme_blocks()
    assert len(blocks) == 3, blocks
    assert block_with("job=gym") and block_with("key-file policy") and block_with("cluster=slurm_testcluster")


def test_the_gym_recipe_as_written(shell):
    home, work, env = shell
    # NeMo Gym where the recipe says it is: a checkout in ~/gym, its venv in ~/gym/.venv (stand-ins).
    bin_dir, records, _ = gym_standins(home / "gym")
    bin_dir.parent.rename(home / "gym" / ".venv")
    data = home / "gym" / "resources_servers" / "example_single_tool_call" / "data"
    data.mkdir(parents=True)
    (data / "example.jsonl").write_text("".join(
        json.dumps({"responses_create_params": {"input": [{"role": "user", "content": f"weather {i}?"}]}}) + "\n"
        for i in range(8)
    ))
    env["STANDIN_RECORD_DIR"] = str(records)

    done = bash(block_with("job=gym"), work, env, timeout_s=900)

    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = (work / "outputs" / "gym").iterdir()
    rows = (run_dir / "gym_rollouts.jsonl").read_text().splitlines()
    assert len(rows) == 5  # job.limit=5
    ng_run = json.loads((records / "ng_run.json").read_text())
    assert ng_run["argv"][1] == (
        "+config_paths=[resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml,"
        "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml]"
    )
    assert ng_run["models_status"] == 200 and ng_run["path"].startswith(f"{home}/gym/.venv/bin:")
    assert Registry(env["GYMLAUNCH_REGISTRY_ROOT"]).namespaces() == []


def test_serve_only_then_the_curl_block_from_another_shell(shell):
    """Also what a serve-only run owes its key: refused without it, a file only its user reads, gone
    after the Ctrl-C and in no file the run wrote; the run `stopped`, nothing of it left. And what
    the registry owes its readers: no URL before it serves (polled from the launcher's start)."""
    home, work, env = shell
    root = Path(env["GYMLAUNCH_REGISTRY_ROOT"])
    launcher = subprocess.Popen(["bash", "-c", "exec python -m launcher job=none"], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # From the launcher's first moment, another shell asks the registry for the service's URL, as the
    # README tells users to: every URL it ever prints must already serve.
    poller = UrlPoller(env, work).start()
    try:
        lines, deadline = [], time.monotonic() + 600
        for line in launcher.stdout:
            lines.append(line)
            if line.strip().startswith("curl "):  # the last of the "serving" lines
                break
            assert time.monotonic() < deadline, "".join(lines)
        printed = "".join(lines)
        assert "serving policy at http://" in printed and "API key: " in printed, printed
        url = re.search(r"serving policy at (\S+)", printed)[1]
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401  # a key is generated per run
        entry = next(e for e in Registry(root).entries() if e.base_url == url)
        key, key_file = entry.read_api_key(), Path(entry.api_key_file)
        assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700

        # The curl line the launcher printed works as printed, and the README's block from another shell.
        printed_curl = bash(lines[-1].strip() + " --fail -s", work, env, timeout_s=60)
        assert printed_curl.returncode == 0 and "smollm2-135m-instruct" in printed_curl.stdout, printed_curl
        done = bash(block_with("key-file policy"), work, env, timeout_s=120)
        assert done.returncode == 0, done.stdout + done.stderr
        answer = json.loads(done.stdout)
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert answer["prompt_token_ids"] and answer["choices"][0]["token_ids"]
        assert answer["choices"][0]["logprobs"]["content"]
        handed_out = poller.stop()
        assert url in handed_out, handed_out  # the gateway, once the launcher says it serves
        for handed, results in handed_out.items():
            assert all(r.ok for r in results), (handed, [r for r in results if not r.ok])
    finally:
        poller.stop()
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, out  # a serve-only run ends with Ctrl-C
    assert Registry(root).namespaces() == []
    run_dir = work / out.strip().splitlines()[-1].removeprefix("run folder: ")  # relative to work, if it is
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert_run_left_nothing(root, summary)
    assert not key_file.exists()
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert written and all(key.encode() not in p.read_bytes() for p in written)  # logs, pickles, summary


class UrlPoller:
    """``python -m server.registry urls policy`` in a loop, on a thread; each URL it prints is put
    through the gate's checks at once (models, chat, tool calls, logprobs and token ids,
    ``/tokenize``), with the key the registry names: their results by URL, first try only."""

    def __init__(self, env: dict, cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.checked: dict[str, list] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> "UrlPoller":
        self._thread.start()
        return self

    def stop(self) -> dict[str, list]:
        self._stop.set()
        self._thread.join()
        return self.checked

    def _registry(self, *args: str) -> str | None:
        done = subprocess.run([sys.executable, "-m", "server.registry", *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=60)
        return done.stdout.strip() if done.returncode == 0 else None

    def _poll(self) -> None:
        while not self._stop.is_set():
            for url in (self._registry("urls", "policy") or "").split(","):
                if url and url not in self.checked:
                    key_file = self._registry("key-file", "policy")
                    self.checked[url] = readiness_checks(
                        url, "smollm2-135m-instruct", api_key=Path(key_file).read_text().strip() if key_file else None,
                        tools=True, logprobs=True)
            self._stop.wait(0.2)


def test_the_slurm_test_cluster_recipe_as_written(slurm_cluster, shell):
    """Start (here: already running, so <1 s), run the embedded default on it, look, stop; then the
    cluster is started again for the tests after this one."""
    _, _, env = shell
    try:
        done = bash(block_with("cluster=slurm_testcluster"), ROOT, env, timeout_s=1200)
    finally:
        again = subprocess.run([str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = Path(done.stdout.split("run folder: ")[1].split()[0])
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "succeeded" and summary["collection"]["rollouts_written"] >= 16
        server_job = summary["servers"][0]["job_id"]
        # sacct -X printed the run's jobs: the server on partition gpu (cancelled by the teardown).
        accounted = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()}
        assert accounted[server_job][2] == "gpu" and accounted[server_job][5].startswith("CANCELLED"), done.stdout
        assert Registry(env["GYMLAUNCH_REGISTRY_ROOT"]).namespaces() == []
        print(f"phases {summary['phases']}")
    finally:
        shutil.rmtree(run_dir)  # it ran where the README says: in the clone's outputs/
        for folder in (run_dir.parent, run_dir.parent.parent):  # outputs/rollouts, outputs: if nothing else
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
