"""Mailboxes: linking, verifying upstream, upkeep, the mail listeners and the proxy's backend."""
