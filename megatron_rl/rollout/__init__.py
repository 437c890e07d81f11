"""Rollout: SGLang client, launcher, router, rewards, group rollout, embedded engine."""
