"""Real NeMo Gym for the test suite, from what the machine has, built once per Gym version and
cached outside the clone (``$GYMLAUNCH_CACHE``, default ~/.cache/gymlaunch), so a second run does
not reinstall.

    python -m tests.gym.provision 0.4.0 [0.7.0]   # prints each Gym venv's bin folder (ng_run, ng_collect_rollouts)

Under ``<cache>/nemo-gym/<version>/``: ``current`` is a symlink to a finished ``build-<stamp>/``
holding ``venv/`` (``nemo-gym==<version>`` and uv, made from the pyenv interpreter that Gym line
needs: nothing can download one here) and ``servers/`` (the uv venv of each Gym server that
``SERVER_CONFIGS`` starts, built by Gym itself: ``ng_run +dry_run=true`` with ``uv_venv_dir``
there). The link is swapped in with one rename once both are complete: a venv cannot be moved after
it is built (its scripts name their interpreter by absolute path), so the link is what makes the
build atomic. ``.lock`` serialises builders: two runs never build at once, and the second finds the
first one's build. ``<cache>/uv`` is uv's cache, shared by every version.

A run then passes ``ng_run_overrides(version)`` to ``ng_run``: the same ``uv_venv_dir`` with
``skip_venv_if_present``, so Gym sources those venvs instead of building them again (Gym 0.4's
default is one venv per server under ng_run's working folder, rebuilt in every new folder)."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The interpreter each supported Gym line installs into: 0.4 needs Python >= 3.12 (0.5+ want >= 3.13.14,
# which this machine does not have). No interpreter can be downloaded here: it comes from pyenv.
PYTHON_FOR = {"0.4": "3.12.1", "0.7": "3.13.0"}
# Lines that declare a Requires-Python floor above that interpreter: 0.5+ say >= 3.13.14, the newest patch
# when Gym moved from 3.12 to 3.13 (Gym PR #2194), not a feature it needs. pip installs them with
# --ignore-requires-python; ng_run's `uv pip install` (each server's venv) resolves as if for the floor
# (`[pip] python-version` in a uv.toml named by UV_CONFIG_FILE): only the resolver's floor moves, the venvs
# run the interpreter above.
RELAXED_FLOOR = {"0.7": "3.13.14"}
# The Gym configs whose servers' venvs are built with Gym itself: those the tests run
# (tests/integration/test_gym_real.py); ng_run builds any other server's venv when it first starts it.
SERVER_CONFIGS = (
    "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml",
    "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
)
# Gym's environment for its own programs: uv (ng_run's per-server venvs) never downloads a Python;
# Gym's Ray (its own, one node) without token auth, which would write ~/.ray/auth_token into the
# home of whoever runs the tests.
GYM_ENV = {"UV_PYTHON_DOWNLOADS": "never", "WANDB_MODE": "disabled", "RAY_TMPDIR": "/tmp/ray",
           "RAY_AUTH_MODE": "disabled"}


def cache_root() -> Path:
    return Path(os.environ.get("GYMLAUNCH_CACHE") or Path.home() / ".cache" / "gymlaunch")


def current(version: str) -> Path:
    """The finished build of ``version`` (a symlink; absent until one is complete)."""
    return cache_root() / "nemo-gym" / version / "current"


def ng_run_overrides(version: str) -> list[str]:
    """``ng_run`` overrides that use the provisioned server venvs and uv cache."""
    return [f"+uv_venv_dir={current(version).resolve() / 'servers'}", "+skip_venv_if_present=true",
            f"+uv_cache_dir={cache_root() / 'uv'}"]


def gym_env(version: str) -> dict[str, str]:
    """Environment the tests give Gym's programs beyond conf/job/gym.yaml's: no Ray token auth (as
    ``GYM_ENV``), and for a line with a relaxed floor uv resolving as for it, should ng_run install
    anything into a server's venv."""
    uv_toml = current(version).resolve() / "uv.toml"
    return {"RAY_AUTH_MODE": "disabled", **({"UV_CONFIG_FILE": str(uv_toml)} if uv_toml.is_file() else {})}


def base_python(version: str) -> Path:
    line = ".".join(version.split(".")[:2])
    if line not in PYTHON_FOR:
        raise SystemExit(f"no interpreter known for NeMo Gym {version}; supported lines: {sorted(PYTHON_FOR)}")
    wanted = PYTHON_FOR[line]
    root = os.environ.get("PYENV_ROOT") or (
        subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True).stdout.strip()
        if shutil.which("pyenv") else str(Path.home() / ".pyenv"))
    python = Path(root) / "versions" / wanted / "bin" / f"python{wanted.rsplit('.', 1)[0]}"
    if not os.access(python, os.X_OK):
        raise SystemExit(f"NeMo Gym {version} needs Python {wanted}; pyenv has no {python}")
    return python


def _build(version: str, build: Path, log: Path) -> dict[str, float]:
    """Gym's venv, then its servers' venvs, into ``build``; the seconds each took."""
    python = base_python(version)
    bin_dir = build / "venv" / "bin"
    env = {**os.environ, **GYM_ENV, "PATH": f"{bin_dir}{os.pathsep}{python.parent}{os.pathsep}{os.environ['PATH']}"}
    took = {}
    with open(log, "w") as out:
        def run(*argv: str, cwd: Path | None = None) -> None:
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, env=env, cwd=cwd)

        relaxed = RELAXED_FLOOR.get(".".join(version.split(".")[:2]))
        if relaxed:
            build.mkdir(parents=True)
            (build / "uv.toml").write_text(f'[pip]\npython-version = "{relaxed}"\n')
            env["UV_CONFIG_FILE"] = str(build / "uv.toml")
        t0 = time.monotonic()
        run(str(python), "-m", "venv", str(build / "venv"))
        run(str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *(["--ignore-requires-python"] if relaxed else []),
            f"nemo-gym=={version}", "uv")
        took["gym venv"] = time.monotonic() - t0
        t0 = time.monotonic()
        # Gym's own dry run: each server's uv venv built (serially), no server started. Placeholder
        # endpoints: the model config interpolates them, nothing connects to them.
        run(str(bin_dir / "ng_run"), f"+config_paths=[{','.join(SERVER_CONFIGS)}]", "+dry_run=true",
            "+policy_base_url=http://127.0.0.1:9/v1", "+policy_api_key=EMPTY", "+policy_model_name=unused",
            f"+uv_venv_dir={build / 'servers'}", f"+uv_cache_dir={cache_root() / 'uv'}", cwd=build)
        took["server venvs"] = time.monotonic() - t0
    return took


def provision(version: str) -> Path:
    """The bin folder of a venv with ``nemo-gym==version`` and uv; built the first time, reused after."""
    here = current(version).parent
    here.mkdir(parents=True, exist_ok=True)
    with open(here / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here for the first one's build
        if (current(version) / "venv" / "bin" / "ng_run").exists():
            return current(version) / "venv" / "bin"
        for stale in here.glob("build-*"):  # an interrupted build; the link never pointed at it
            shutil.rmtree(stale, ignore_errors=True)
        build = here / f"build-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
        log = here / "build.log"
        print(f"building NeMo Gym {version} into {build} (log: {log})", file=sys.stderr)
        try:
            took = _build(version, build, log)
        except subprocess.CalledProcessError as error:
            shutil.rmtree(build, ignore_errors=True)
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"provisioning NeMo Gym {version} failed ({error}); {log}:\n{tail}") from None
        print(", ".join(f"{name} {s:.1f} s" for name, s in took.items()), file=sys.stderr)
        link = here / f".current-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(build.name)
        os.replace(link, current(version))  # the one step that makes the build visible
        return current(version) / "venv" / "bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="nemo-gym releases, e.g. 0.4.0 0.7.0 (built in turn)")
    args = parser.parse_args()
    for version in args.versions:
        started = time.monotonic()
        bin_dir = provision(version)
        print(f"NeMo Gym {version} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(bin_dir)


if __name__ == "__main__":
    main()
