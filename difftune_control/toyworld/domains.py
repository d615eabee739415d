"""Target domains of the toy world: shifted versions of the world the base model learnt.

A domain is a :class:`~.scene.Domain`, a parameterisation of the one scene sampler and renderer
(object count, colours, floors, camera, light). ``default`` is the base model's own world; the
shifted domains give fine-tuning something to transfer to and retention something to protect
against. Captions stay in the world's vocabulary.

```python
from difftune_control.toyworld import domain_names, render_scenes

domain_names()                                   # ['default', 'crowded', 'dusk', 'swapped']
out = render_scenes(16, seed=0, domain="dusk")   # same scenes as default, lit at dusk
```

Add one with :func:`register_domain` (before datasets are rendered from it).
"""

from __future__ import annotations

from .scene import COLOURS, FLOOR_COLOURS, Domain

_DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Add ``domain`` to the registry under ``domain.name``.

    Args:
        domain ([`Domain`]): the parameters; every colour name should be a word of
            :func:`~.scene.vocabulary` so captions stay in the world's vocabulary.

    Returns:
        [`Domain`]: ``domain``, so a module can write ``DUSK = register_domain(Domain(...))``.

    Raises:
        ValueError: if the name is taken or the parameters are inconsistent (every problem at once).
    """
    problems = domain.problems()
    if domain.name in _DOMAINS:
        problems.append(f"a domain named {domain.name!r} is already registered")
    if problems:
        raise ValueError(f"register_domain({domain.name!r}): " + "; ".join(problems))
    _DOMAINS[domain.name] = domain
    return domain


def domain_names() -> list[str]:
    """Names of the registered domains, ``default`` first, then in registration order."""
    return list(_DOMAINS)


def get_domain(name: str | Domain) -> Domain:
    """Look a domain up by name (a :class:`Domain` passes through).

    Raises:
        ValueError: for an unknown name; the message lists the registered domains.
    """
    if isinstance(name, Domain):
        return name
    if name not in _DOMAINS:
        choices = ", ".join(f"{k} ({d.description})" for k, d in _DOMAINS.items())
        raise ValueError(f"unknown toy-world domain {name!r}; choose from: {choices}")
    return _DOMAINS[name]


DEFAULT = register_domain(Domain())

CROWDED = register_domain(
    Domain(
        name="crowded",
        description="3-4 objects per scene, packed closer together and seen from further away",
        n_object_probs=(0.0, 0.0, 0.5, 0.5),
        depth_spread=1.0,
        camera_distance=(5.4, 0.8),
    )
)
"""Crowded scenes: only 3- and 4-object captions ("a, b and c on a grey floor"), which the base
saw in 35% of its scenes and cannot follow well."""

DUSK = register_domain(
    Domain(
        name="dusk",
        description="low warm sunlight (long shadows), dim blue ambient light, an orange-violet sky",
        light_elevation=(5.0, 9.0),
        light_colour=(1.0, 0.62, 0.34),
        ambient=(0.12, 0.08),
        ambient_colour=(0.55, 0.60, 0.95),
        sky_horizon=((0.78, 0.42, 0.24), (0.10, 0.08, 0.06)),
        sky_zenith=((0.14, 0.12, 0.30), (0.08, 0.06, 0.10)),
    )
)
"""Dusk: the default scenes under a light the base never saw (darker, warmer, long shadows)."""

_SWAPPED_OBJECTS = ("white", "grey", "black", "brown")
_SWAPPED_FLOORS = ("red", "yellow", "green", "blue")
SWAPPED = register_domain(
    Domain(
        name="swapped",
        description="objects in the floor colours (white, grey, black, brown) on floors in object colours",
        colours={name: FLOOR_COLOURS[name] for name in _SWAPPED_OBJECTS},
        floor_colours={name: COLOURS[name] for name in _SWAPPED_FLOORS},
    )
)
"""Swapped colours: achromatic and brown objects on red, yellow, green or blue floors; every word
is in the vocabulary, but no such object or floor was ever rendered for the base."""
