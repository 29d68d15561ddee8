"""The orchestrator: config -> validated spec -> submitted jobs -> readiness -> teardown."""

from omegaconf import OmegaConf

# What a run is called unless run.name says otherwise (conf/config.yaml): after what it does.
_RUN_NAMES = {"rollouts": "rollouts", "none": "serve", "command": "command", "gym": "gym"}
OmegaConf.register_new_resolver("gymlaunch.run_name", lambda kind: _RUN_NAMES.get(kind, kind), replace=True)
