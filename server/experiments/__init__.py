"""A/B experiments over aliases: the exposure log (log.py), the statistics of a report
(report.py) and guardrails that take a misbehaving arm out (guardrails.py)."""
