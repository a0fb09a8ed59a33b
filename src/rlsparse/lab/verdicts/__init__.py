"""The lab's verdicts: one small module per finding, each judging ``results.json`` data by a rule
fixed in ``preregistration.json``, showing the control that would make it fail, and saying so.

Every module exposes ``finding(results, prereg) -> Finding``; ``report.findings`` calls them in
order. ``common`` holds the ``Finding`` type and the accessors that read old and new results alike.
"""
