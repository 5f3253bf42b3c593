"""Helper functions and constants shared by test modules (fixtures live in ``conftest.py``).

One module per subject: ``linking`` (the peers' OAuth server and linking by code), ``mail``
(the app's proxy in front of the peers and the stdlib mail clients), ``tokens``, ``accounts``,
``clients``, ``serving`` (the serve process), ``sims`` (the provider simulators),
``notifications`` and ``proxy`` (raw sockets against the proxy).
"""
