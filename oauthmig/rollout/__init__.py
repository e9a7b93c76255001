"""Schema rollout: revisions, the routed runner, finalize, offline SQL, backfill jobs, status."""
