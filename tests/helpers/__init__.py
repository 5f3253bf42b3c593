"""Helper functions and constants shared by test modules (fixtures live in ``conftest.py``).

One module per subject: ``app`` (the app on a fresh instance, the test accounts), ``web``
(forms with their CSRF token, signing in, a live server), ``linking`` (the peers' OAuth server
and linking by code), ``mail`` (the app's proxy in front of the peers and the stdlib mail
clients), ``tokens``, ``accounts``, ``clients``, ``serving`` (the serve process), ``sims`` (the
provider simulators), ``graph``, ``notifications``, ``proxy`` (a scriptable backend and the
proxy on loopback) and ``dashboard`` (the browser tests' layout check and screenshots).
"""
