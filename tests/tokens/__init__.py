"""Tests of the token lifecycle against the peers' OAuth server and scripted token endpoints."""
