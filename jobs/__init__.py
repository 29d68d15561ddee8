"""What consumes endpoints: the rollout collector, its tools and verifiers, the endpoint pool."""
