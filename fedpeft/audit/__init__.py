"""The audit wing: who the attacks are run against, and what is concluded from them.

* :mod:`fedpeft.audit.victim` — the grid cells' victims (the scenario's model and data, or a tiny
  byte-vocabulary model), their private batches and the public token prior of the baseline;
* :mod:`fedpeft.audit.grid` — the ``key=v1,v2`` grid and one cell's client, sent through
  :func:`fedpeft.update.encode_update` exactly like a real client's reply;
* :mod:`fedpeft.audit.run` — ``fedpeft audit``: attack every cell, score against the truth, verdicts;
* :mod:`fedpeft.audit.capture` — ``fedpeft audit --capture``: attack the updates of a real run;
* :mod:`fedpeft.audit.report` — ``audit.csv`` / ``audit.json`` / ``audit.md`` / ``audit.png``.

The attack algorithms, :class:`~fedpeft.attacks.observation.Observation` and the leakage metrics live
in :mod:`fedpeft.attacks`, which never imports this package.
"""
