"""OAuth: provider presets, clients, the browser flow, endpoint requests, the token lifecycle
and their errors."""
