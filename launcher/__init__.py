"""The orchestrator: config -> validated spec -> submitted jobs -> readiness -> teardown."""
