"""Mailboxes: linking one, verifying it upstream, keeping it fresh, and the mail proxy's backend."""
