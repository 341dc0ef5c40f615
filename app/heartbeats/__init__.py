"""Process liveness: every worker and the maintenance process say they are alive; ``/readyz`` reads it."""
