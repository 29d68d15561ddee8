"""job=command and job=gym through the whole launcher, against the stand-in server
(server=openai_command), with real small programs that record what they received.

NeMo Gym is not installed here: job=gym runs stand-ins for ng_run and ng_collect_rollouts
(tests/support.py) that behave like them where the launcher relies on it."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from server.registry import Registry
from tests.support import ROOT, STANDIN_SERVER, gym_standins, run_launcher, start_launcher

SERVED = "standin-model"

# Records argv + the endpoint environment, then calls the first endpoint with and without the key.
RECORDER = textwrap.dedent("""
    import json, os, sys, httpx
    from jobs.pool import EndpointPool
    base_url = os.environ["POLICY_BASE_URLS"].split(",")[0]
    body = {"model": os.environ["POLICY_MODEL_NAME"], "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": "Bearer " + os.environ["POLICY_API_KEY"]}
    pool = EndpointPool("policy", namespace=os.environ["GYMLAUNCH_NAMESPACE"])
    record = {
        "argv": sys.argv,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("POLICY_", "GYMLAUNCH_", "EXTRA_"))},
        "cwd": os.getcwd(),
        "with_key": httpx.post(base_url + "/chat/completions", json=body, headers=auth).status_code,
        "without_key": httpx.post(base_url + "/chat/completions", json=body).status_code,
        "pool": sorted(e.base_url for e in pool.endpoints()),
    }
    with open(sys.argv[-1], "w") as f:
        json.dump(record, f)
""")

def launch(run_dir: Path, registry_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_launcher(registry_root, *STANDIN_SERVER, f"model.served_name={SERVED}", f"hydra.run.dir='{run_dir}'",
                        *overrides)


def test_command_gets_the_endpoints_in_env_and_argv_and_not_the_key_in_argv(tmp_path):
    folder = tmp_path / "with space"  # placeholders fill whole words: paths with spaces survive
    folder.mkdir()
    (folder / "record.py").write_text(RECORDER)
    run_dir, root = tmp_path / "run dir", tmp_path / "registry"
    command = f"{{python}} '{folder / 'record.py'}' --urls {{base_urls}} --first {{base_url}} --model {{model}} {{run_dir}}/received.json"
    out = launch(run_dir, root, "job=command", f'job.command="{command}"', "server.replicas=2",
                 f"+job.env.PYTHONPATH={ROOT}", "+job.env.EXTRA_FLAG=on", "job.setup=['export EXTRA_SETUP=ran']")
    assert out.returncode == 0, out.stdout + out.stderr

    got = json.loads((run_dir / "received.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    urls = [s["base_url"] for s in summary["servers"]]
    assert len(urls) == 2 and got["pool"] == sorted(urls)  # the registry still lists the replicas
    env = got["env"]
    gateway = summary["gateway"]["base_url"]  # the one URL the program gets, and the file that keeps it
    assert env["POLICY_BASE_URLS"] == gateway and env["POLICY_MODEL_NAME"] == SERVED
    assert Path(env["POLICY_ENDPOINT_FILE"]) == run_dir / "policy.url"
    assert env["GYMLAUNCH_NAMESPACE"] == summary["namespace"] and env["GYMLAUNCH_REGISTRY_ROOT"] == str(root)
    assert (env["EXTRA_FLAG"], env["EXTRA_SETUP"], got["cwd"]) == ("on", "ran", str(ROOT))
    assert (got["with_key"], got["without_key"]) == (200, 401)
    assert got["argv"][1:] == ["--urls", gateway, "--first", gateway, "--model", SERVED,
                               str(run_dir / "received.json")]
    key = env["POLICY_API_KEY"]
    assert len(key) > 20 and not any(key in word for word in got["argv"])
    assert key not in (run_dir / "summary.json").read_text()
    assert summary["status"] == "succeeded" and summary["job"]["argv"][0][1] == str(folder / "record.py")
    assert Registry(root).namespaces() == []  # torn down


def test_a_failing_command_fails_the_run_with_its_output_tail(tmp_path):
    command = "{python} -c 'import sys; print(\\\"partial result\\\"); sys.exit(\\\"boom: no tasks\\\")'"
    out = launch(tmp_path / "run", tmp_path / "registry", "job=command", f'job.command="{command}"')
    assert out.returncode == 1, out.stdout + out.stderr
    assert "command exited with code 1" in out.stdout
    assert "partial result" in out.stdout and "boom: no tasks" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "exited with code 1" in summary["error"]
    assert Registry(tmp_path / "registry").namespaces() == []


def gym_overrides(bin_dir: Path, records: Path, tasks: Path) -> list[str]:
    return [
        "job=gym", f"job.gym_bin='{bin_dir}'", f"+job.env.STANDIN_RECORD_DIR={records}",
        "job.config_paths=[resources_servers/example/configs/example.yaml,responses_api_models/vllm_model/configs/vllm_model_for_training.yaml]",
        "job.agent_name=example_simple_agent", f"job.input_jsonl={tasks}", "job.limit=3",
        "job.num_samples_in_parallel=2", "job.stop_grace_s=10",
    ]


@pytest.mark.parametrize("gateway", ["default", "off"])
def test_gym_runs_ng_run_then_collects_then_stops_ng_run(tmp_path, gateway):
    bin_dir, records, tasks = gym_standins(tmp_path)
    run_dir = tmp_path / "run"
    out = launch(run_dir, tmp_path / "registry", *gym_overrides(bin_dir, records, tasks), "server.replicas=2",
                 f"gateway={gateway}")
    assert out.returncode == 0, out.stdout + out.stderr

    summary = json.loads((run_dir / "summary.json").read_text())
    # Gym 0.7 (the stand-ins' venv says so): its own endpoint wait cut short, our gate did that.
    extra = ["++model_endpoint_readiness_timeout_seconds=20"]
    if gateway == "off":  # the replicas, Gym's vllm_model spreads rollouts over them itself
        endpoints = ["+policy_base_url=[" + ",".join(s["base_url"] for s in summary["servers"]) + "]"]
    else:  # the gateway's one URL; Gym follows its endpoint file and names each rollout
        model = "++policy_model.responses_api_models.vllm_model"
        endpoints = [f"+policy_base_url={summary['gateway']['base_url']}"]
        extra += [f"{model}.endpoint_file={run_dir / 'policy.url'}", f"{model}.endpoint_connection_retries=40",
                  f"{model}.forward_session_id_as_conversation_id=true"]
    ng_run = json.loads((records / "ng_run.json").read_text())
    assert ng_run["argv"][1:] == [
        "+config_paths=[resources_servers/example/configs/example.yaml,"
        "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml]",
        *endpoints, f"+policy_model_name={SERVED}", "+policy_api_key=${oc.env:POLICY_API_KEY}", *extra,
    ]
    # The training config (found in the Gym install): the gate checked token ids, logprobs, /tokenize.
    assert all({"logprobs", "tokenize"} <= set(s["checks"]) for s in summary["servers"]), summary["servers"]
    assert summary["job"]["gym_version"] == "0.7.0"
    assert ng_run["models_status"] == 200  # the key reached it through the environment
    assert ng_run["path"].startswith(f"{bin_dir}:") and ng_run["uv_python_downloads"] == "never"
    collect = json.loads((records / "ng_collect_rollouts.json").read_text())
    output = run_dir / "gym_rollouts.jsonl"
    assert collect["ng_run_up"] and collect["argv"][1:] == [
        "+agent_name=example_simple_agent", f"+input_jsonl_fpath={tasks}", f"+output_jsonl_fpath={output}",
        "+limit=3", "+num_samples_in_parallel=2",
    ]
    assert len(output.read_text().splitlines()) == 3
    assert (records / "ng_run.stopped").exists()  # SIGINT, Gym's own shutdown
    assert "NeMo Gym finished!" in (run_dir / "logs" / "ng_run.log").read_text()
    # The stand-in Gym writes rows without token ids: no consecutive calls to check.
    assert summary["collection"] == {"rollouts_written": 3, "rollouts_path": str(output), "prefix_contiguous": 0,
                                     "prefix_checked": 0}


def test_gym_stops_ng_run_also_when_collection_fails(tmp_path):
    bin_dir, records, tasks = gym_standins(tmp_path)
    run_dir = tmp_path / "run"
    out = launch(run_dir, tmp_path / "registry", *gym_overrides(bin_dir, records, tasks),
                 "+job.env.STANDIN_COLLECT_FAIL=1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ng_collect_rollouts exited with code 1" in out.stdout and "one rollout failed" in out.stdout
    assert (records / "ng_run.stopped").exists()
    assert not (run_dir / "gym_rollouts.jsonl").exists()


SLEEPER = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    def stopped(signum, frame):
        open(out + ".stopped", "w").write(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopped)
    open(out, "w").write(str(os.getpid()))
    while True:
        time.sleep(0.1)
""")


def test_ctrl_c_on_the_launcher_stops_the_running_command(tmp_path):
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    pid_file = tmp_path / "sleeper.pid"
    proc = start_launcher(tmp_path / "registry", *STANDIN_SERVER, f"hydra.run.dir={tmp_path / 'run'}",
                          "job=command", f'job.command="{{python}} {tmp_path / "sleeper.py"} {pid_file}"')
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in out, out  # launcher.exit_codes.INTERRUPTED
    assert (tmp_path / "sleeper.pid.stopped").read_text() == "SIGTERM"
    assert not Path(f"/proc/{pid_file.read_text()}").exists()
