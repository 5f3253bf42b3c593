"""OAuth: provider presets, clients, the browser flow, endpoint requests and the token lifecycle."""
