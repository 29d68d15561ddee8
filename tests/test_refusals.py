"""The first hour of a new user: every mistake refused before anything exists, with the fix.

Each test runs the real command line (``python -m launcher ...``, Hydra composing conf/) in a
fresh process, from a folder of its own, and looks at what it left behind: a refusal exits 2,
names the key, and leaves no output folder (``outputs/`` or ``hydra.run.dir``), no ``.hydra``,
no log and nothing in the registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from launcher import exit_codes
from launcher.cli import quote_tilde_values
from launcher.spec import unknown_key

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS = ROOT / "jobs" / "tasks" / "demo.jsonl"


def launcher(tmp_path: Path, *args: str, argv0: list[str] | None = None, path: str | None = None,
             timeout_s: float = 120) -> subprocess.CompletedProcess:
    """``python -m launcher ARGS`` run from ``tmp_path/cwd``, the registry in ``tmp_path/registry``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GYMLAUNCH_REGISTRY_ROOT": str(tmp_path / "registry")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([*(argv0 or [sys.executable, "-m", "launcher"]), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def assert_refused(out: subprocess.CompletedProcess, tmp_path: Path, *expected: str) -> str:
    """Exit 2, each of ``expected`` in the message, and nothing left behind."""
    message = " ".join(out.stderr.split())  # rich wraps long lines
    assert out.returncode == exit_codes.REFUSED, out.stdout + out.stderr
    assert message.startswith("config error "), out.stderr
    for text in expected:
        assert " ".join(text.split()) in message, out.stderr
    assert "Traceback" not in out.stderr
    assert list((tmp_path / "cwd").iterdir()) == []  # no outputs/, .hydra, log
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())
    return message


RUN_DIR = "hydra.run.dir={tmp}/run"


# Without hydra.run.dir the run folder would be outputs/... in the launcher's folder (checked empty);
# with it, that folder (checked absent).
@pytest.mark.parametrize("args,expected", [
    (["server.replica=2"], "server.replica: no such key; did you mean server.replicas"),
    (["server.replica=2", RUN_DIR], "server.replica: no such key; did you mean server.replicas"),
    (["+server.replica=2"], "server.replica: no such key; did you mean server.replicas"),
    (["job.sampling.temprature=0.5"], "job.sampling.temprature: no such key; did you mean job.sampling.temperature?"),
    (["sever.replicas=2"], "sever.replicas: no such key; did you mean server.replicas?"),
    (["server=vlm"], "server=vlm: no option 'vlm' in group server; did you mean server=vllm? "
                     "options: openai_command, sglang, vllm, vllm_cpu"),
    (["+experiment=dem"], "+experiment=dem: no option 'dem' in group experiment; did you mean +experiment=demo?"),
    (["server.replicas=0", RUN_DIR], "server.replicas: must be >= 1, got 0"),
    # Names that become paths: before, the namespace and its key were made two levels above the
    # registry root (and the run folder outside outputs/), entries were written into the root.
    (["run.name=../../escape"], "run.name: '../../escape' must match [A-Za-z0-9][A-Za-z0-9._-]* without '..'"),
    (["server.service=..", RUN_DIR], "server.service: '..' must match [A-Za-z0-9][A-Za-z0-9._-]* without '..'"),
    # A registry root in a file's place, or below one: before, a traceback (exit 1) and a run folder.
    (["registry.root={tmp}/file"], "registry.root: {tmp}/file is not a folder"),
    (["registry.root={tmp}/file/registry", RUN_DIR],
     "registry.root: {tmp}/file/registry cannot be created: {tmp}/file is not a folder"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_mistake_is_refused_with_the_fix_and_leaves_nothing(tmp_path, args, expected):
    (tmp_path / "file").write_text("")
    assert_refused(launcher(tmp_path, *(a.format(tmp=tmp_path) for a in args)), tmp_path,
                   expected.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "file"]  # nothing made beside the folder either


def test_every_unknown_key_is_named_at_once(tmp_path):
    out = launcher(tmp_path, "server.replica=2", "job.samplin.top_p=1", "job.num_repeats=2")
    assert_refused(out, tmp_path, "server.replica: no such key; did you mean server.replicas",
                   "job.samplin.top_p: no such key; did you mean job.sampling.top_p?")


def test_job_gym_without_gym_is_refused_at_once_naming_gym_bin_and_the_fix(tmp_path):
    args = ["job=gym", "job.config_paths=[a.yaml]", "job.agent_name=x", f"job.input_jsonl={DEMO_TASKS}"]
    # The floor: the same interpreter, imports and Hydra composition, showing the config only.
    t0 = time.monotonic()
    shown = launcher(tmp_path, "--cfg", "job", "--package", "run", path="/usr/bin:/bin")
    startup_s = time.monotonic() - t0
    assert shown.returncode == 0, shown.stderr
    t0 = time.monotonic()
    out = launcher(tmp_path, *args, RUN_DIR.format(tmp=tmp_path), path="/usr/bin:/bin")
    refused_s = time.monotonic() - t0
    print(f"\njob=gym refused in {refused_s:.2f}s (python + Hydra startup, --cfg job: {startup_s:.2f}s)")
    assert_refused(out, tmp_path, "job.gym_bin: ng_run and ng_collect_rollouts are not on PATH",
                   "install NeMo Gym in a venv (Python >= 3.12) and set job.gym_bin=/path/to/venv/bin")
    if startup_s < 1.5:  # on a machine too loaded to start Python in time, nothing left behind is the check
        assert refused_s < 2.0


def test_job_command_with_a_missing_program_is_refused(tmp_path):
    out = launcher(tmp_path, "job=command", 'job.command="no-such-eval --base-url {base_url}"')
    assert_refused(out, tmp_path, "job.command: no-such-eval is not on PATH; give its full path, or add job.setup")


def test_a_message_with_brackets_is_printed_whole(tmp_path):
    out = launcher(tmp_path, "job=gym")
    assert_refused(out, tmp_path, "job.config_paths: NeMo Gym needs its configs (resources server, model, agent), "
                   "e.g. job.config_paths=[resources_servers/.../configs/x.yaml,"
                   "responses_api_models/vllm_model/configs/vllm_model.yaml]")


def test_a_sweep_with_one_bad_point_is_refused_before_anything_runs(tmp_path):
    out = launcher(tmp_path, "-m", "job.sampling.temperature=0.2,-1,0.8", f"hydra.sweep.dir={tmp_path}/sweep")
    assert_refused(out, tmp_path, "sweep point #1 of 3 (job.sampling.temperature=-1): invalid config:",
                   "job.sampling.temperature: must be >= 0, got -1.0")
    assert "#0" not in out.stderr and "#2" not in out.stderr
    out = launcher(tmp_path, "-m", "server.replica=1,2", f"hydra.sweep.dir={tmp_path}/sweep")
    assert_refused(out, tmp_path, "server.replica: no such key; did you mean server.replicas")


def test_a_value_starting_with_tilde_is_taken(tmp_path):
    # Hydra's grammar refuses a bare ~; the launcher quotes it, and the path is expanded where it is used.
    out = launcher(tmp_path, "job=gym", "job.gym_bin=~/no-such-gym/bin", "--cfg", "job", "--package", "job")
    assert out.returncode == 0 and "gym_bin: ~/no-such-gym/bin" in out.stdout, out.stderr
    out = launcher(tmp_path, "job=gym", "job.gym_bin=~/no-such-gym/bin", "job.config_paths=[a.yaml]",
                   "job.agent_name=x", f"job.input_jsonl={DEMO_TASKS}")
    assert_refused(out, tmp_path, f"job.gym_bin: no executable ng_run in {Path.home()}/no-such-gym/bin")
    # Where quoting would change the meaning (a sweep) the message says how to write it; where the
    # value would stay a literal ~ (a key the launcher does not expand), it says to let the shell spell it.
    out = launcher(tmp_path, "-m", "job=gym", "job.gym_bin=~/a,~/b")
    assert_refused(out, tmp_path, "LexerNoViableAltException", """write 'job.gym_bin="~/a","~/b"'""",
                   "job.gym_bin=$HOME/a,$HOME/b")
    out = launcher(tmp_path, "-m", "hydra.sweep.dir=~/sweeps")
    assert_refused(out, tmp_path, "hydra.sweep.dir would keep it as written (a folder named ~): let the shell "
                   "spell your home instead: hydra.sweep.dir=$HOME/sweeps")


def test_commands_that_run_nothing_work_as_before(tmp_path):
    shown = launcher(tmp_path, "--cfg", "job", "--package", "server")
    assert shown.returncode == 0 and "replicas: 1" in shown.stdout, shown.stderr
    helped = launcher(tmp_path, "--help")
    assert helped.returncode == 0 and "gymlaunch: servers for a service" in helped.stdout, helped.stderr
    info = launcher(tmp_path, "--info", "defaults")
    assert info.returncode == 0 and "schema/job/rollouts" in info.stdout, info.stderr
    assert list((tmp_path / "cwd").iterdir()) == []


def test_the_gymlaunch_console_script(tmp_path):
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["gymlaunch"]
    assert entry == "launcher.__main__:main"
    module, function = entry.split(":")
    script = tmp_path / "gymlaunch"
    script.write_text(  # what pip writes for a [project.scripts] entry
        f"#!{sys.executable}\nimport re, sys\nfrom {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    shown = launcher(tmp_path, "--cfg", "hydra", "--package", "hydra.job", argv0=[str(script)])
    assert shown.returncode == 0 and "name: launcher" in shown.stdout, shown.stderr  # as python -m launcher: launcher.log
    assert_refused(launcher(tmp_path, "server.replica=2", argv0=[str(script)]), tmp_path,
                   "did you mean server.replicas")


# ---------------------------------------------------------------- the pieces


def test_tilde_values_are_quoted_only_where_quoting_changes_nothing_else():
    assert quote_tilde_values(["job.gym_bin=~/gym/.venv/bin", "+job.cwd=~", "-m", "server.replicas=2"]) == [
        "job.gym_bin='~/gym/.venv/bin'", "+job.cwd='~'", "-m", "server.replicas=2"]
    untouched = ["job.gym_bin=~/a,~/b", "job.config_paths=[~/a]", "~job.gym_bin", "job.cwd='~/a'",
                 "job.cwd=~/${oc.env:USER}", "--config-dir=~/conf", "job.cwd=a~b",
                 # keys that would keep a literal ~: Hydra's own folders, a program's environment
                 "hydra.run.dir=~/runs", "+job.env.HF_HOME=~/hf"]
    assert quote_tilde_values(untouched) == untouched


def test_unknown_key_suggests_close_keys_or_lists_them():
    assert unknown_key("server", "replica", ["replicas", "port"]) == (
        "server.replica: no such key; did you mean server.replicas?")
    assert unknown_key("", "sever", ["server", "job", "hydra"], rest="replicas") == (
        "sever.replicas: no such key; did you mean server.replicas?")
    assert unknown_key("job", "zzz", ["kind", "tasks"]) == "job.zzz: no such key; job's keys: kind, tasks"


def test_exit_codes_are_decided_in_one_place():
    codes = {status: exit_codes.for_status(status) for status in ("succeeded", "stopped", "failed", "interrupted")}
    assert codes == {"succeeded": 0, "stopped": 0, "failed": 1, "interrupted": 130}
    assert exit_codes.for_status("something new") == exit_codes.FAILED
    assert exit_codes.REFUSED == 2


def test_rich_markup_in_a_message_is_printed_as_text(capsys):
    from launcher.__main__ import refuse

    with pytest.raises(SystemExit) as exited:
        refuse("job.config_paths: e.g. job.config_paths=[a.yaml,b.yaml] or [/x] [bold]")
    assert exited.value.code == 2
    assert "job.config_paths=[a.yaml,b.yaml] or [/x] [bold]" in capsys.readouterr().err
