"""The static assets (CSS, JS) copied into every rendered atlas, shipped as atlas.static."""
