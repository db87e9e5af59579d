"""The Jinja2 environment of every build: the repository's templates/, autoescape on,
StrictUndefined (a typo in a template is an error), and the filters the templates use."""

from __future__ import annotations

import math

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from atlas.store import layer_dirname


def environment() -> Environment:
    """Jinja2 with autoescape on and StrictUndefined: a typo in a template is an error."""
    env = Environment(
        loader=PackageLoader("atlas.templates", ""),  # templates/ of the repository
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # one build: no stat of every template for each page
    )
    env.filters["number"] = lambda v: "-" if v is None else f"{v:.3f}"
    env.filters["seconds"] = lambda v: "-" if v is None else f"{v:.2f} s"
    env.filters["change"] = lambda v: "-" if v is None or math.isnan(v) else f"{v:.2f}"
    env.filters["signed"] = lambda v: f"{v:+.3g}"
    env.filters["dash"] = lambda v: "-" if v is None else v
    env.filters["percent"] = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    env.filters["layer_dir"] = layer_dirname  # a layer's folder, for links between layers
    return env
