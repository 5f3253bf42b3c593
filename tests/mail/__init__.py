"""Tests of the mail proxy with the app's own backend in front of the real peers."""
