"""jinja2 rendering for every text that goes into a guest or into libvirt."""

from functools import cache

import jinja2

from xenlab.paths import TEMPLATES_DIR


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=lambda name: name is not None and name.endswith(".xml.j2"),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def source(template: str) -> str:
    """The template's own text, for recipe hashes."""
    return (TEMPLATES_DIR / template).read_text()
