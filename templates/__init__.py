"""The Jinja2 templates of the site and compare pages, shipped in the wheel as atlas.templates."""
