"""Pages from the Jinja2 templates in ``templates/`` (autoescaping on: every value is text, never markup).

``base.html.j2`` holds the one style sheet; each page extends it. Numbers reach the pages through the
filters of :mod:`rcat_ray.core.numbers`, so every page formats a rate the same way.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from rcat_ray.core.numbers import percent, percent_ci, percent_interval, signed

__all__ = ["render_page"]


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("rcat_ray.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(percent=percent, percent_ci=percent_ci, percent_interval=percent_interval, signed=signed)
    return env


def render_page(template: str, **context: Any) -> str:
    """The page ``template`` (a file name under ``templates/``) rendered with ``context``."""
    return _environment().get_template(template).render(**context)
