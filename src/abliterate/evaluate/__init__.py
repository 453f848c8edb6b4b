"""Judging answers and measuring damage: verdicts, LLM judges, KL and length damage, capability tasks."""
