"""Telling people: alert channels with their memory (alerts.py), the health of every backup against its RPO
(health.py), and Prometheus metrics (metrics.py)."""
