"""The web UI: one blueprint module per screen, their forms, the CLI and the security baseline."""
