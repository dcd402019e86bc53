"""Learner -> rollout weight transfer: process groups, buckets, versioned broadcast."""
