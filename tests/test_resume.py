"""Resume's refusals and its command line, without servers: ``python -m launcher run.resume=<folder>``
refuses a folder that is not a run's, and an override that would change what the run collected,
before anything is created; the collector refuses an output folder another collector holds.
The resumes themselves (SIGKILL, Ctrl-C): tests/integration/test_resume.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.rollouts import CollectorConfig, OutputBusy, collect
from launcher import exit_codes
from launcher.__main__ import CONF_DIR, CONFIG_NAME, run
from launcher.cli import check_before_hydra
from launcher.executors import LocalBackend, Resources
from launcher.resume import command, resume_argv
from launcher.spec import ClusterSpec
from server.registry import Registry
from tests.support import ROOT, publish

SAVED = ["job.num_repeats=2", "job.sampling.temperature=0.3", "server.replicas=1"]


def launcher(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GYMLAUNCH_REGISTRY_ROOT": str(tmp_path / "registry")}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as Hydra leaves it (.hydra/ with config, hydra config and overrides), the files
    written by Hydra itself (``--cfg``) for the SAVED overrides; nothing was run in it."""
    tmp = tmp_path_factory.mktemp("saved")
    folder = tmp / "run one"  # a space: the resume command must quote it
    (folder / ".hydra").mkdir(parents=True)
    for part, name in (("job", "config.yaml"), ("hydra", "hydra.yaml")):
        out = launcher(tmp, *SAVED, f"hydra.run.dir='{folder}'", "--cfg", part)
        assert out.returncode == 0, out.stderr
        (folder / ".hydra" / name).write_text(out.stdout)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(SAVED))
    return folder


def assert_refused(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode == exit_codes.REFUSED, out.stdout + out.stderr
    for text in expected:
        assert text in out.stderr, out.stderr


def test_no_such_folder_is_refused_naming_run_resume(tmp_path):
    for args in (["run.resume=gone"], ["--resume", "gone"], ["--resume=gone"]):
        assert_refused(launcher(tmp_path, *args), f"run.resume: no folder {tmp_path / 'gone'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, no registry


def test_a_folder_without_saved_config_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    assert_refused(launcher(tmp_path, "run.resume=plain"), "run.resume:", "has no saved config",
                   ".hydra/config.yaml")
    assert list((tmp_path / "plain").iterdir()) == []


@pytest.mark.parametrize("override, key", [
    ("job.num_repeats=4", "job.num_repeats"),
    ("job.sampling.temperature=0.9", "job.sampling.temperature"),
    ("job.tasks=/elsewhere.jsonl", "job.tasks"),
    ("model.served_name=other", "model.served_name"),
])
def test_an_override_that_changes_what_was_collected_is_refused(tmp_path, run_folder, override, key):
    before = sorted(p.name for p in run_folder.rglob("*"))
    out = launcher(tmp_path, f"run.resume={run_folder}", override)
    assert_refused(out, f"run.resume: would change what {run_folder} collected", f"  {key}: ")
    assert sorted(p.name for p in run_folder.rglob("*")) == before


def test_the_saved_config_comes_back_with_the_resume_overrides_on_top(run_folder):
    argv = resume_argv(["--resume", str(run_folder), "job.timeout_min=99", "server.replicas=2"])
    assert argv[:2] == ["--config-name", CONFIG_NAME]
    assert argv[2:] == ["job.num_repeats=2", "job.sampling.temperature=0.3", "job.timeout_min=99",
                        "server.replicas=2", f"hydra.run.dir='{run_folder}'", f"run.resume='{run_folder}'"]
    # How it is served and submitted may change: the check passes (and creates nothing).
    check_before_hydra(argv, run, CONF_DIR, CONFIG_NAME)


def test_a_multirun_or_another_folder_is_refused(tmp_path, run_folder):
    assert_refused(launcher(tmp_path, "-m", f"run.resume={run_folder}"), "run.resume: resumes one run folder")
    assert_refused(launcher(tmp_path, f"run.resume={run_folder}", "hydra.run.dir=elsewhere"),
                   "run.resume: runs in the folder it resumes; drop hydra.run.dir=elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_the_resume_command_survives_the_shell():
    folder = Path("/tmp/a run's folder")
    assert shlex.split(command(folder)) == ["python", "-m", "launcher", f"run.resume={folder}"]


def test_a_second_collector_on_one_output_folder_is_refused_naming_the_holder(tmp_path, standins):
    publish(tmp_path / "registry", standins(1))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # another process holds the lock as a running collector does
        [sys.executable, "-c", "import sys; from pathlib import Path; from jobs.rollouts import _OutputLock\n"
         "with _OutputLock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()", str(out)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        cfg = CollectorConfig(output_dir=str(out), namespace="run1", registry=Registry(tmp_path / "registry"))
        with pytest.raises(OutputBusy) as refused:
            collect(cfg)
        assert f"{out} is being written by another collector (pid {holder.pid} on " in str(refused.value)
        assert not (out / "rollouts.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # The holder gone (its lock with it), the folder is free again.
    summary = collect(CollectorConfig(output_dir=str(out), namespace="run1", registry=Registry(tmp_path / "registry")))
    assert summary.rollouts_written == summary.tasks


def test_a_recorded_local_job_id_is_stopped_only_while_it_still_names_that_runs_job(tmp_path):
    """A local job id is a pid, which the system reuses once the job ended: a resume days later must
    not signal whatever process has that pid now."""
    backend = LocalBackend(ClusterSpec(kind="local"), tmp_path / "submitit")
    job = backend.submit(time.sleep, 60, Resources(name="sleeper", timeout_min=5))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ids = [str(job.job_id), str(stranger.pid)]
        assert LocalBackend.submitted_from(ids, tmp_path / "submitit") == [str(job.job_id)]
        assert LocalBackend.submitted_from(ids, tmp_path / "elsewhere") == []
    finally:
        stranger.kill()
        backend.force_cancel(job)
        stranger.wait(timeout=10)
